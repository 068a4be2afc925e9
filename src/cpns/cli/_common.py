"""Helpers shared by the subcommands: reading a password, data directories, progress
bars, log format."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from cpns.errors import ConfigurationError

__all__ = [
    "LOG_FORMAT_ENV",
    "add_data_dir",
    "add_log_format",
    "add_progress",
    "log_format_choice",
    "progress_bars",
    "read_password",
]

#: Environment variable choosing the log format when no flag does (``text`` or ``json``).
LOG_FORMAT_ENV = "CPNS_LOG_FORMAT"


def add_log_format(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-format text|json`` (and its older spelling ``--log-json``)."""
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help=f"log lines as text (the default) or one JSON object per line; "
        f"default from ${LOG_FORMAT_ENV} (docs/logging.md)",
    )
    parser.add_argument(
        "--log-json",
        action="store_const",
        const="json",
        dest="log_format",
        help="same as --log-format json",
    )


def log_format_choice(args: argparse.Namespace) -> str | None:
    """The log format chosen by flag, else by ``$CPNS_LOG_FORMAT``; None if neither.

    Raises:
        ConfigurationError: the environment variable holds something else.
    """
    flag = getattr(args, "log_format", None)
    if flag is not None:
        return str(flag)
    env = os.environ.get(LOG_FORMAT_ENV, "").strip().lower()
    if not env:
        return None
    if env not in ("text", "json"):
        raise ConfigurationError(f"{LOG_FORMAT_ENV} must be 'text' or 'json', not {env!r}")
    return env


def add_data_dir(parser: argparse.ArgumentParser, default: str) -> None:
    """Add the ``--data-dir`` option every party's subcommands share."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(default),
        help=f"directory holding this party's files (default: {default})",
    )


def read_password(from_stdin: bool, *, confirm: bool = False) -> str:
    """The password from one line of stdin, or from a prompt without echo."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Again: ") != password:
            raise ConfigurationError("the two passwords differ")
    if not password:
        raise ConfigurationError("empty password")
    return password


def add_progress(parser: argparse.ArgumentParser) -> None:
    """Add ``--progress`` / ``--quiet`` (progress bars on standard error)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--progress",
        action="store_true",
        help="show progress bars on standard error even when it is not a terminal",
    )
    group.add_argument("--quiet", action="store_true", help="no progress bars")


@contextlib.contextmanager
def progress_bars(args: argparse.Namespace) -> Iterator[Callable[[str, int, int], None]]:
    """``progress(phase, rows, total)`` drawing one bar per phase on standard error.

    Bars are shown with ``--progress``, or when standard error is a terminal unless
    ``--quiet``; otherwise the callback does nothing (nothing is written to stderr).
    """
    shown = bool(getattr(args, "progress", False)) or (
        sys.stderr.isatty() and not getattr(args, "quiet", False)
    )
    if not shown:
        yield lambda phase, rows, total: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True, force_terminal=sys.stderr.isatty() or None)
    tasks: dict[str, TaskID] = {}
    with Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bars:

        def advance(phase: str, rows: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bars.add_task(phase, total=total or None)
            bars.advance(tasks[phase], rows)

        yield advance
