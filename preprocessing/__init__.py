"""Dataset preparation: `prepare.py` (ImageFolder -> shards), `sources.py` (reading and ADM's
centre crop), `bench_dataset.py` (read throughput of `dataset.LatentDataset`)."""
