"""The network: one forward per block (layers.py), the Model that loads and runs it (model.py, load.py),
linears over packed weights (linear.py), fused projections (fuse.py) and RoPE tables (rope.py)."""
