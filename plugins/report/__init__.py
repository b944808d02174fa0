"""The build report: written after every build, and by ``charfw report``."""
