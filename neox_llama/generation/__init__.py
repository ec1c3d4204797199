"""Text generation from a checkpoint: KV cache, sampling, chat prompt styles."""
