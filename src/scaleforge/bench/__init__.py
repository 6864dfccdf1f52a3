"""Benchmarks: `scaleforge bench ...`; each prints a table (or JSON) and says what it measured."""
