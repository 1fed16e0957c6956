"""Algorithms shared by stages and benchmarks: perceptual hashes, vector search, union-find, concept matching."""
