"""``splitkernels`` command line. Each layer adds its own subcommands through a ``register``
function, so this file only wires them together."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

# Modules that contribute subcommands: each has register(subparsers) -> None.
_COMMAND_MODULES = ("splitkernels.runtime.cli", "splitkernels.planner.cli")


def _cmd_backends(args: argparse.Namespace) -> int:
    from . import backends

    print(json.dumps(backends(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="show which kernel backends are available")
    p.set_defaults(func=_cmd_backends)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that layer is not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
