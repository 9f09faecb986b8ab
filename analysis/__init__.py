"""Representation analyses of a checkpoint: linear probing, CKNNA and token similarity
(`python -m analysis`; the metrics in `analysis.metrics`)."""
