"""Stages, one file each, named as the stage: each registers its class with @register_stage (contract/registry.py)."""
