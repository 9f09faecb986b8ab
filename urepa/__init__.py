"""The library behind the entry points: the training loop, checkpoints, the data format, the frozen
networks, compilation, sampling settings and the command-line helpers (docs/layout.md)."""
