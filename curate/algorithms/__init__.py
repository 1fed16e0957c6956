"""Algorithms shared by stages and benchmarks: perceptual hashes, vector search, connected components, concept matching."""
