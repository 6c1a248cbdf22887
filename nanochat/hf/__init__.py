"""The remote code that `nanochat export hf` copies beside an exported checkpoint.

These files are package data, not part of the library: they must run where nanochat is not
installed (only torch + transformers), so nothing in nanochat imports them.
"""
