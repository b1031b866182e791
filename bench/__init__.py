"""Benchmarks, each figure beside a baseline built from the same inputs: `python -m bench`."""
