"""The model presets and example configs, shipped in the package as ``neox_llama.configs`` (YAML files only)."""
