"""Shared data loading and model definitions for the benchmark scripts."""
