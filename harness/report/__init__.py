"""Reporting: how results reach a person or a CI system.

Owns: the terminal report and progress (``console``, the only harness module
that imports rich), the JSON, JUnit and Markdown files (``exporters``), and the
HTML timeline of a chaos report (``timeline``).

May import every other part of the harness; nothing imports it but the CLI.
"""
