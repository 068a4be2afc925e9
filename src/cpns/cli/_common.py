"""Helpers shared by the subcommands: reading a password, data directories."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from cpns.errors import ConfigurationError

__all__ = ["add_data_dir", "read_password"]


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
