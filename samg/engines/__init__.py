"""samg.engines."""
