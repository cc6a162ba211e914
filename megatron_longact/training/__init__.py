"""The SFT/RL trainer, its engine and the LM loop behind longact-train."""
