"""Target profiles shipped with sessctl: YAML data only, read through importlib.resources."""
