"""Taggers for the tag stage and `charfw tag`."""
