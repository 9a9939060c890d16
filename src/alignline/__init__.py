"""alignline: a complete LLM alignment pipeline (Xwin-LM and TSO)."""

__version__ = "0.1.0"
