"""Flax NNX model definitions and their checkpoint IO, tokenizers and text templates.

Uses only kernels and the root utilities; engine and train both build on it.
"""
