"""The tiny tokenizer's files (package data), and ``build.py``, which made them.

Owns nothing imported at run time: ``wire.tokens`` reads these files.
"""
