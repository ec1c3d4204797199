"""Data: memory-mapped token datasets, packed samples, splits, blending, loaders, sample assets."""
