"""Background removers for the background stage."""
