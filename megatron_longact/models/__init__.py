"""Model configs, the GPTModel builder and TP sharding utilities."""
