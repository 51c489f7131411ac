"""Tokenization: the `Tokenizer` class, GGUF vocabulary rebuilding, and chat templates."""

from .chat import CHATML_TEMPLATE, ChatTemplateError, render_chat
from .tokenizer import Tokenizer

__all__ = ["Tokenizer", "render_chat", "CHATML_TEMPLATE", "ChatTemplateError"]
