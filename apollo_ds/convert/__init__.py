"""Checkpoint and weight conversion: full (unsharded) weights, Hugging Face export."""
