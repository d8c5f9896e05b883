"""sessctl: race-test LLM session servers."""

__version__ = "0.1.0"
