"""Benchmarks users can run on their own machines, buckets and clusters: ``python -m trainkit.bench``."""
