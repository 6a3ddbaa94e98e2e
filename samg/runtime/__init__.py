"""samg.runtime."""
