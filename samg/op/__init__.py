"""samg.op."""
