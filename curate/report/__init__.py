"""Static HTML report of a work dir: everything read back from the stats and stage Parquet."""
