"""Quality evaluation: sliding-window perplexity, comparison against a reference model, texts."""
from .quality import QualityReport, compare, compare_logits, perplexity, windows
from .text import TEXTS, load_text

__all__ = ["perplexity", "compare", "compare_logits", "QualityReport", "windows", "load_text", "TEXTS"]
