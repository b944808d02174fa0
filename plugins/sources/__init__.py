"""Image sources for the ingest stage."""
