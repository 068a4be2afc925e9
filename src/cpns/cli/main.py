"""The one ``cpns`` command (DESIGN §7): parse arguments, dispatch, map errors to exit codes.

Exit codes scripts can trust:

* 0 - done;
* 1 - an unexpected internal error (a bug: please report it);
* 2 - bad usage or configuration;
* 3 - the procedure was refused (the status is printed);
* 4 - a peer (server, gateway daemon) could not be reached;
* 5 - time ran out waiting for a PNE (``gateway assign --wait``: no PNE proved receipt;
  ``device run --once``: no key arrived).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cpns import __version__
from cpns.errors import ConfigurationError, CPNSError, ProcedureRejected, StoreError, TransportError

__all__ = ["main"]

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_UNREACHABLE = 4

#: The ``party`` field of the log lines each command group writes (docs/logging.md).
_PARTY = {"server": "server", "admin": "server", "gateway": "gateway", "device": "pne"}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render docs/cli.md)."""
    from cpns.cli import admin_cmd, demo_cmd, server_cmd, trace_cmd

    parser = argparse.ArgumentParser(
        prog="cpns",
        description=(
            "CPNS security enabler: a CPNS Server, a PN Gateway daemon and a PNE agent.\n"
            "Start with 'cpns demo' to watch a PN GW and a PNE without UI get their EUKeys."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cpns {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    server_cmd.register(sub)
    admin_cmd.register(sub)
    try:
        from cpns.cli import gateway_cmd
    except ImportError:  # pragma: no cover - present in every release
        pass
    else:
        gateway_cmd.register(sub)
    try:
        from cpns.cli import device_cmd
    except ImportError:  # pragma: no cover - present in every release
        pass
    else:
        device_cmd.register(sub)
    demo_cmd.register(sub)
    trace_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cpns`` command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if not logging.getLogger("cpns").handlers:
        from cpns.cli._common import log_format_choice
        from cpns.logs import setup_logging

        try:
            log_format = log_format_choice(args)
        except ConfigurationError as exc:
            print(f"cpns: {exc}", file=sys.stderr)
            return EXIT_USAGE
        setup_logging(
            json_lines=log_format == "json",
            level="DEBUG" if args.verbose else "INFO",
            party=_PARTY.get(str(args.command), "cli"),
        )
    try:
        return int(args.func(args))
    except ProcedureRejected as exc:
        print(f"cpns: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except TransportError as exc:
        print(f"cpns: unreachable: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (ConfigurationError, StoreError) as exc:
        print(f"cpns: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CPNSError as exc:
        print(f"cpns: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
