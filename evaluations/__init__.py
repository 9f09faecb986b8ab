"""ADM-compatible image metrics (FID, sFID, Inception Score, precision, recall) in PyTorch, and
FD-DINOv2 (`dinov2.py`).

Stands alone: reads `.npz` files and imports nothing else from this repository, so the folder can
be copied into another project. Commands: `evaluator.py` (metrics) and `make_reference.py`.
"""
