"""Numba kernels: pure functions over arrays. No JAX, no I/O, nothing else of ours imported."""
