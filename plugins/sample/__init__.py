"""Samplers for the sample stage: images made with each part's finished LoRA."""
