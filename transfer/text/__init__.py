"""Text input for transformer models: tokenisation to fixed-vocabulary ids."""
from transfer.text.tokenizer import Encoded, Tokenizer

__all__ = ["Encoded", "Tokenizer"]
