"""Dataset-config writers for the dataset stage and `charfw toml`."""
