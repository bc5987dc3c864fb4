"""dyprag."""
