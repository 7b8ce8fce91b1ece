"""speed: align small open LLMs to write embedding training data at scale (SPEED)."""

__version__ = "0.1.0"
