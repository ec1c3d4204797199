"""Evaluating checkpoints: perplexity and bits per byte over text or token datasets (lm-evaluation-harness: not yet)."""
