"""Benchmarks (`make bench`): each compares a stage with the raw operation it sits on, in one run."""
