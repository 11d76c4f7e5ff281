"""``splitkernels backends``: which kernel backends this installation can use."""
from __future__ import annotations

import argparse
import json


def _cmd_backends(args: argparse.Namespace) -> int:
    from .. import backends

    print(json.dumps(backends(), indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("backends", help="show which kernel backends are available")
    p.set_defaults(func=_cmd_backends)
