"""How the command line fails: one line on stderr and an exit status per class of failure.

=====  ==================================================================
 0     success
 1     internal error (a bug: the traceback is printed with ``--debug``)
 2     usage: a bad flag or flag value
 3     input file: missing, unreadable, not JSON, or a field out of schema
 4     connection: the server cannot be reached, the stream broke, a port cannot be bound
 5     auth: the server refused the token
 6     server refusal: the server answered, but refused the request
 7     ``plan``: no configuration meets the limits
=====  ==================================================================
"""
from __future__ import annotations

import enum

from ..runtime.protocol import SplitError, Status


class Exit(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    USAGE = 2
    INPUT_FILE = 3
    CONNECTION = 4
    AUTH = 5
    REFUSED = 6
    INFEASIBLE = 7


class CliError(Exception):
    """A failure the command line reports as one line and ``exit`` status."""

    exit: Exit = Exit.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(CliError):
    exit = Exit.USAGE


class InputFileError(CliError):
    """A file given on the command line cannot be used; the message names the file and field."""

    exit = Exit.INPUT_FILE

    def __init__(self, path: str, problem: str, field: str | None = None) -> None:
        where = f"{path}: field {field!r}" if field else str(path)
        super().__init__(f"{where}: {problem}")
        self.path, self.field = path, field


class ConnectionFailure(CliError):
    exit = Exit.CONNECTION


class AuthFailure(CliError):
    exit = Exit.AUTH


class ServerRefusal(CliError):
    exit = Exit.REFUSED


_CONNECTION = (Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED)


def from_split_error(exc: SplitError, server: str) -> CliError:
    """Classify a failed request to ``server`` (``host:port``)."""
    if exc.status is Status.UNAUTHENTICATED:
        return AuthFailure(f"{server} refused the token ({exc.message}); pass --token or set SPLITKERNELS_TOKEN")
    if exc.status in _CONNECTION:
        return ConnectionFailure(f"cannot reach the server at {server} ({exc.status.value}: {exc.message})")
    return ServerRefusal(f"the server at {server} refused the request ({exc.status.value}: {exc.message})")
