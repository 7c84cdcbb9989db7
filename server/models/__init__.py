"""Model definitions on our paged-attention ops, and weight loading from Hugging Face directories."""

from .config import ModelConfig
from .loader import load_model

__all__ = ["ModelConfig", "load_model"]
