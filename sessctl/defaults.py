"""Defaults the CLI names in its help text and the commands use: a module of their
own, so that the CLI shows them without importing the harness."""

DEFAULT_EXTERNAL_UPSTREAM = "127.0.0.1:8900"
"""Where the chaos upstream listens when an external target must be pointed at it."""
