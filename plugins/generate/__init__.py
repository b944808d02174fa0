"""``charfw generate``: images from a prompt file, with LoRAs, infotext and an index."""
