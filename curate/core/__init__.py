"""The core: typed configs, the pipeline runner, table schemas, decisions, stats, export."""
