"""Argument parsing with one-line errors, and the value types flags are checked against."""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, NoReturn

from .errors import Exit


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (``prog: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(Exit.USAGE)


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{'an integer' if kind is int else 'a number'} is required, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"a finite number is required, got {text!r}")
    return value


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in ``[low, high]``."""

    def parse(text: str) -> int:
        value = _number(int, text)
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_range(low, high, '<=')}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def number(low: float | None = None, high: float | None = None, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    def parse(text: str) -> float:
        value = _number(float, text)
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {_range(low, high, '<' if low_open else '<=')}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be {_range(low, high, '<' if low_open else '<=')}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _range(low, high, low_op: str) -> str:
    if low is not None and high is not None:
        return f"{low} {low_op} value <= {high}"
    if low is not None:
        return f"{'>' if low_op == '<' else '>='} {low}"
    return f"<= {high}"


port = integer(0, 65535)
positive_int = integer(1)
non_negative_int = integer(0)
positive = number(0.0, low_open=True)
non_negative = number(0.0)
