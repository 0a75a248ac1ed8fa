"""What a user does with a trained model: measure it on held-out text (``evaluate``) and sample
from it (``generate``), from a native run directory (any layout) or a Hugging Face export,
through one interface (``models.load``)."""
