"""What lowgear runs on: devices and their facts (hardware.py), which layer goes where (placement.py),
dtypes per device (dtypes.py) and the environment variables lowgear reads (env.py)."""
