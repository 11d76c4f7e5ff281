"""The four texts sessions 14, 23 and 24 score as text no codec rule was tuned on, found where this
machine keeps them: vim's todo.txt, numpy's ndarraytypes.h, CMake's cmake_path.rst and torch's
nn/modules/module.py (plain text, C, reStructuredText, Python).

    python bench/e2e/unseen_texts.py   # their paths, space-separated (missing ones left out)
"""
from __future__ import annotations

import glob
import pathlib


def unseen_texts() -> list[str]:
    """The paths of the four texts that exist here, in the order above."""
    import numpy
    import torch

    found = [sorted(glob.glob("/usr/share/vim/vim*/doc/todo.txt"))[-1:],
             [str(pathlib.Path(numpy.get_include()) / "numpy" / "ndarraytypes.h")],
             sorted(glob.glob("/usr/share/cmake*/Help/command/cmake_path.rst"))[-1:],
             [str(pathlib.Path(torch.__file__).parent / "nn" / "modules" / "module.py")]]
    return [p for group in found for p in group if pathlib.Path(p).exists()]


if __name__ == "__main__":
    print(" ".join(unseen_texts()))
