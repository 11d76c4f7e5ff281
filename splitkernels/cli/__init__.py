"""``splitkernels`` command line: ``serve``, ``cluster``, ``edge``, ``demo``, ``plan``, ``profile``, ``backends``.

Each command group lives in its own module with a ``register(subparsers)`` function. Every
failure is one line on stderr with an exit status per class (:mod:`.errors`); ``--debug`` adds
the traceback.
"""
from __future__ import annotations

import argparse
import sys
import traceback

from ..runtime.protocol import SplitError
from . import backends, cluster, generate, planner, serve
from .args import ArgumentParser
from .errors import CliError, Exit, from_split_error

_GROUPS = (generate, serve, cluster, planner, backends)
_EXIT_HELP = ("exit status: 0 success, 1 internal error, 2 usage (a flag), 3 input file, 4 connection, 5 auth "
              "(token), 6 refused by the server, 7 plan: no configuration meets the limits")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="splitkernels", description="Split LLM inference: the edge runs the front "
                            "layers, a codec carries the split layer's hidden states, the server runs the rest.",
                            epilog=_EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print the traceback of a failure")
    debug = ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand without --debug must not reset the top-level flag.
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    original = sub.add_parser

    def add_parser(name: str, **kw):
        return original(name, parents=[debug, *kw.pop("parents", [])], **kw)

    sub.add_parser = add_parser
    for group in _GROUPS:
        group.register(sub)
    return parser


def _fail(prog: str, message: str, code: Exit) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return int(code)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (0 on success, see :mod:`.errors`)."""
    args = build_parser().parse_args(argv)
    prog = f"splitkernels {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", Exit.INTERNAL) if args.debug else 130
    except CliError as exc:
        if args.debug:
            traceback.print_exc()
        return _fail(prog, exc.message, exc.exit)
    except SplitError as exc:
        if args.debug:
            traceback.print_exc()
        error = from_split_error(exc, getattr(args, "server", "the server"))
        return _fail(prog, error.message, error.exit)
    except (ValueError, TypeError) as exc:  # a value a flag let through but the library refused
        if args.debug:
            traceback.print_exc()
        return _fail(prog, f"invalid value: {exc}", Exit.USAGE)
    except Exception as exc:  # a bug: say so in one line, the traceback on request
        if args.debug:
            traceback.print_exc()
        return _fail(prog, f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                     Exit.INTERNAL)


__all__ = ["main", "build_parser", "Exit"]
