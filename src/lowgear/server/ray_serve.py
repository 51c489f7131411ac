"""Placeholder, filled in below."""
from ..errors import require


def serve_from_cli(args) -> int:
    require("ray.serve", "ray", "lowgear serve --ray")
    return 0
