"""samg.export."""
