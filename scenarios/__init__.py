"""The built-in race library: YAML data only, read through importlib.resources."""
