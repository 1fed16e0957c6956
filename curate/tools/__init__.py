"""Tools around the pipeline: the synthetic pool, the demo, recipe comparison, CLIP training and evaluation, ingest, docs."""
