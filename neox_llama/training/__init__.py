"""Training: the DeepSpeed engine and everything around it. The only package that touches the engine."""
