"""LoRA (kohya networks.lora)."""
