"""Tests of the image-preparation plugins (rembg, WD14, BLIP, dedup, collection, tag tools)."""
