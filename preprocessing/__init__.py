"""Dataset preparation: `prepare.py` (ImageFolder -> shards), `sources.py` (reading and ADM's
centre crop). Read throughput is measured by `bench/data_speed.py`."""
