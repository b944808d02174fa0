"""Image preparers for the prepare stage."""
