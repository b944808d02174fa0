"""LoRA finishing: the block-weight merge and SVD compression stages, and ``charfw lora``."""
