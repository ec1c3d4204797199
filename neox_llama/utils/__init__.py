"""Small helpers shared by every part of neox_llama."""
