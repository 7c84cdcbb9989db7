"""trainer/: the s1 SFT recipe on trl. `train(TrainConfig(...))` or `s1serve train CONFIG` writes a
Hugging Face model directory the server serves, rendered with the server's own ThinkTemplate."""

from .config import TrainConfig
from .train import TrainOutcome, train

__all__ = ["TrainConfig", "TrainOutcome", "train"]
