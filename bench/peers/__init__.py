"""Adapters that run peer projects' own code (kept out of this repository) for benchmarks."""
