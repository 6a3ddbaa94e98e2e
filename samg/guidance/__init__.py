"""samg.guidance."""
