"""Benchmarks (narch bench)."""
