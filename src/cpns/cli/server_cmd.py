"""``cpns server init`` and ``cpns server run``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpns.cli._common import add_data_dir, add_log_format, log_format_choice

__all__ = ["register"]


def _init(args: argparse.Namespace) -> int:
    from cpns.server.main import init_server
    from cpns.store.postgres import redact_dsn

    config = init_server(
        args.data_dir,
        host=args.host,
        port=args.port,
        cert=args.cert,
        key=args.key,
        server_id=args.server_id,
        realm=args.realm,
        digest_algorithms=tuple(args.digest),
        database=args.database,
    )
    print(f"initialised {config.data_dir}")
    print(f"  database: {redact_dsn(config.store_target())}")
    print(f"  certificate for gateways (--ca): {config.path(config.cert_file)}")
    print(
        f"  master key (keep it safe, outside backups of the database): "
        f"{config.path(config.master_key_file)}"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    from cpns.server.config import load_server_config
    from cpns.server.main import serve_forever

    choice = log_format_choice(args)
    # Neither --log-format nor CPNS_LOG_FORMAT: server.toml's log_json decides.
    log_json = choice == "json" or (choice is None and load_server_config(args.data_dir).log_json)
    if log_json and choice is None:
        from cpns.logs import JSONFormatter

        for handler in logging.getLogger("cpns").handlers:
            handler.setFormatter(JSONFormatter())
    return serve_forever(
        args.data_dir, workers=args.workers, listen_fd=args.listen_fd, log_json=log_json
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``server`` command group."""
    server = sub.add_parser(
        "server",
        help="run the CPNS Server",
        description="The CPNS Server: HTTPS endpoint, SQLite or PostgreSQL store.",
    )
    cmds = server.add_subparsers(dest="server_command", metavar="SUBCOMMAND")
    init = cmds.add_parser(
        "init",
        help="create a data directory (config, master key, certificate, database)",
        description="Create the server's data directory. A self-signed certificate is "
        "generated unless --cert/--key are given.",
    )
    add_data_dir(init, "cpns-server")
    init.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    init.add_argument("--port", type=int, default=8443, help="TCP port, 0 = any (default 8443)")
    init.add_argument("--cert", type=Path, help="PEM certificate to use instead of generating one")
    init.add_argument("--key", type=Path, help="PEM private key for --cert")
    init.add_argument("--server-id", default="cpns-server", help="this server's Entity ID")
    init.add_argument("--realm", default="cpns", help="Digest realm and password salt")
    init.add_argument(
        "--database",
        metavar="URL_OR_FILE",
        help="postgresql://user:password@host:port/dbname (an existing database; its tables "
        "are created now), or a SQLite file name in the data directory (default cpns.db)",
    )
    init.add_argument(
        "--digest",
        action="append",
        choices=["SHA-256", "MD5"],
        default=None,
        help="Digest algorithm to offer, most preferred first; "
        "repeat for several (default SHA-256; MD5 only for legacy clients)",
    )
    init.set_defaults(func=lambda a: _init(_with_default_digest(a)))
    run = cmds.add_parser(
        "run",
        help="serve until SIGINT/SIGTERM",
        description="Serve the CPNS protocol over HTTPS (TLS 1.3).",
    )
    add_data_dir(run, "cpns-server")
    add_log_format(run)
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="serve with N worker processes on one socket under a supervisor that restarts "
        "a worker that dies (N > 1 needs PostgreSQL; default 1: one process)",
    )
    # A worker of --workers: serve on the supervisor's socket (inherited file descriptor).
    run.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    run.set_defaults(func=_run)


def _with_default_digest(args: argparse.Namespace) -> argparse.Namespace:
    if not args.digest:
        args.digest = ["SHA-256"]
    return args
