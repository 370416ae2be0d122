"""Benchmark scripts reproducing the Catastrophic Fisher Explosion experiments."""
