"""The `lowgear` command: doctor, generate, chat, serve, bench."""

from .main import main

__all__ = ["main"]
