"""Reading shards and writing tables: nothing here knows what a stage computes."""
