"""Image filters for the optional filter stage (near-duplicate removal)."""
