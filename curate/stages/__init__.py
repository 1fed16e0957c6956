"""Stages: each module registers its stages in the registry (stages/registry.py)."""
