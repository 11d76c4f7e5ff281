"""Evaluation texts shipped with the package (no download at run time)."""
from __future__ import annotations

from importlib import resources

# name -> file under splitkernels/eval/data. Botchan (Natsume Soseki, tr. Yasotaro Morri;
# Project Gutenberg #8868, public domain) is test/botchan.txt of the sentencepiece==0.2.3 source
# package with the Gutenberg header (through the "Produced by" line) and the footer (from
# "End of Project Gutenberg's") removed.
TEXTS = {"botchan": "botchan.txt"}


def load_text(name: str = "botchan") -> str:
    """The evaluation text ``name`` (one of :data:`TEXTS`) as a str."""
    if name not in TEXTS:
        raise ValueError(f"name must be one of {tuple(TEXTS)}, got {name!r}")
    return resources.files(__package__).joinpath("data", TEXTS[name]).read_text(encoding="utf-8")
