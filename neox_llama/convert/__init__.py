"""Hugging Face <-> neox_llama weight names and configs."""
