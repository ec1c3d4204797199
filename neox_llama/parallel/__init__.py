"""Parallel wrappers around the single-device model: topology, tensor parallelism, pipeline."""
