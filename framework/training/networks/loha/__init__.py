"""LoHa (LyCORIS)."""
