"""One accelerate-based trainer for every model (tokenizers and generators)."""
