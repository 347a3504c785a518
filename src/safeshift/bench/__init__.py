"""Benchmarks behind ``safeshift bench …``: each prints its figures side by side in one run."""
