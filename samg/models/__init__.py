"""samg.models."""
