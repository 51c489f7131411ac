"""`lowgear bench`: random models of real shapes (synthetic.py, models.py), peers (peer.py), the report."""
