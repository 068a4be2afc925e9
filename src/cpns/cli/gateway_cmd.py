"""``cpns gateway ...``: enrol a PN GW, run its daemon, assign EUKeys to PNEs, show status.

The commands are thin (STYLE §7): parse arguments, build the configuration, then either
call the library (:func:`cpns.gateway.daemon.enroll`, :class:`GatewayDaemon`) or talk to
the running daemon over its control socket (JSON lines).

The user's password is turned into the password key *here*, in the process the user
typed it into (:func:`cpns.crypto.password_key`); the daemon only ever receives the
derived key over its owner-only control socket, and the password itself is never
stored, logged or sent.

Exit codes follow :mod:`cpns.cli.main`: 0 done, 2 usage or configuration, 3 refused
(the status name is printed), 4 the server or the daemon could not be reached, 5
``assign --wait`` ran out before the PNE proved receipt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from pathlib import Path
from typing import Any, Final

from cpns.cli._common import add_data_dir, add_log_format, read_password
from cpns.crypto.kdf import password_key
from cpns.errors import ConfigurationError
from cpns.gateway.config import (
    CONTROL_SOCKET,
    DEFAULT_PAN_PORT,
    GatewayConfig,
    load_config,
    write_config,
)
from cpns.gateway.daemon import GatewayDaemon, enroll, offline_status
from cpns.protocol.key_assignment import claim_key
from cpns.runtime import run_event_loop

__all__ = ["register"]

_DEFAULT_DIR: Final = "cpns-gateway"
_EXIT_OK: Final = 0
_EXIT_USAGE: Final = 2
_EXIT_REFUSED: Final = 3
_EXIT_UNREACHABLE: Final = 4
#: ``assign --wait``: the key is stored but no PNE proved receipt in time.
_EXIT_TIMEOUT: Final = 5
#: Seconds the control client allows the daemon beyond ``--wait`` (the server hop budget).
_CONTROL_MARGIN: Final = 60.0


class DaemonUnreachable(Exception):
    """The control socket does not answer (the daemon is not running)."""


def _control(data_dir: Path, request: dict[str, Any], *, timeout: float) -> dict[str, Any]:
    """Send one JSON request on the control socket and return the JSON reply."""
    path = data_dir / CONTROL_SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise DaemonUnreachable(f"no gateway daemon answers on {path} ({exc})") from None
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            with sock.makefile("rb") as stream:
                line = stream.readline()
        except OSError as exc:
            raise DaemonUnreachable(f"gateway daemon did not answer on {path} ({exc})") from None
    if not line:
        raise DaemonUnreachable(f"gateway daemon closed {path} without answering")
    reply = json.loads(line)
    if not isinstance(reply, dict):
        raise DaemonUnreachable("gateway daemon sent a malformed reply")
    return reply


def _password_key(args: argparse.Namespace) -> bytes:
    password = read_password(args.password_stdin)
    return password_key(password, realm=args.realm, user_id=args.user)


# -- handlers ----------------------------------------------------------------------------


def _enroll(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir
    try:
        config = GatewayConfig(
            data_dir=data_dir,
            entity_id=args.entity_id,
            server_url=args.server,
            ca_file=Path(args.ca).resolve(),
            server_id=args.server_id,
            pan_host=args.pan_host,
            pan_port=args.pan_port,
        )
    except ConfigurationError as exc:
        print(f"cpns gateway enroll: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    if not config.ca_file.is_file():
        print(f"cpns gateway enroll: no certificate file {config.ca_file}", file=sys.stderr)
        return _EXIT_USAGE
    key = _password_key(args)
    # ProcedureRejected / TransportError / StoreError reach cpns.cli.main's exit codes.
    asyncio.run(enroll(config, args.user, key))
    write_config(config)
    print(f"enrolled PN GW {config.entity_id} for user {args.user} at {config.server_url}")
    print(f"configuration: {config.config_file}")
    return _EXIT_OK


def _run(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {}
    if args.pan_port is not None:
        overrides["pan_port"] = args.pan_port
    if args.pan_host is not None:
        overrides["pan_host"] = args.pan_host
    config = load_config(args.data_dir, overrides=overrides)
    run_event_loop(GatewayDaemon(config).run())
    return _EXIT_OK


#: What an empty claim code stands for: a well-formed code that proves no label. Enough
#: to re-assign the user's own PNE once TK-based authentications ratcheted its TK (the
#: server can no longer check a label then, deviations D-003-13); refused otherwise.
NO_LABEL_CODE: Final = "AAAA-AAAA-AAAA-AAAA"


def _read_claim_code(args: argparse.Namespace) -> str:
    """The claim code from --claim-code, else the next stdin line (with --password-stdin),
    else a prompt (D-003-10: the claim proves the user holds the PNE's label)."""
    if args.claim_code is not None:
        return str(args.claim_code)
    if args.password_stdin:
        return sys.stdin.readline().strip()
    return input("Claim code (from the PNE's label; empty to re-assign a PNE you hold): ")


def claim_key_of(code: str) -> bytes:
    """The claim key of a typed code; an empty code stands for :data:`NO_LABEL_CODE`.

    Raises: ValueError: not a claim code.
    """
    return claim_key(code if code.strip() else NO_LABEL_CODE)


def _assign(args: argparse.Namespace) -> int:
    if args.wait < 0:
        print("cpns gateway assign: --wait must be >= 0", file=sys.stderr)
        return _EXIT_USAGE
    key = _password_key(args)
    try:
        claim = claim_key_of(_read_claim_code(args))
    except ValueError as exc:
        print(f"cpns gateway assign: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    request = {
        "op": "assign",
        "pne_id": args.pne,
        "user_id": args.user,
        "password_key": key.hex(),
        "claim_key": claim.hex(),
        "wait": args.wait,
    }
    try:
        reply = _control(args.data_dir, request, timeout=args.wait + _CONTROL_MARGIN)
    except DaemonUnreachable as exc:
        print(f"cpns gateway assign: {exc}", file=sys.stderr)
        return _EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(reply, sort_keys=True))
    status = str(reply.get("status"))
    txid = reply.get("txid") or "-"
    if reply.get("flow"):
        txid += f", flow {reply['flow']}"  # the ID to give 'cpns trace'
    if reply.get("ok"):
        if not args.json:
            stage = reply.get("stage")
            what = {
                "delivered": "delivered to the PNE and acknowledged",
                "stored": "received and stored; delivered when the PNE attaches",
            }.get(str(stage), str(stage))
            print(f"OK: EUKey for {args.pne} {what} (txid {txid})")
        return _EXIT_OK
    if status == "TIMEOUT" and reply.get("stage") == "stored":
        if not args.json:
            print(_not_proven_text(args.pne, args.wait, reply))
        return _EXIT_TIMEOUT
    if not args.json:
        print(
            f"{status}: EUKey assignment for {args.pne} refused at {reply.get('hop')} "
            f"(stage {reply.get('stage')}, txid {txid})"
        )
    return _EXIT_UNREACHABLE if status == "UPSTREAM_UNAVAILABLE" else _EXIT_REFUSED


def _not_proven_text(pne: str, wait: float, reply: dict[str, Any]) -> str:
    """``--wait`` ran out before the PNE proved receipt (D-PAN-2): what happened and what
    was ignored, never an unauthenticated claim presented as the outcome."""
    text = (
        f"TIMEOUT: no PNE proved receipt of its EUKey within {wait:g} s; the key for {pne} "
        f"is stored and offered again whenever {pne} attaches (txid {reply.get('txid')})"
    )
    ignored = reply.get("unverified_acks")
    if isinstance(ignored, int) and ignored > 0:
        text += (
            f". {ignored} unauthenticated answer(s) ignored (last claimed "
            f"{reply.get('unverified_status')}): anyone on the PAN can send those"
        )
    return text


def _status(args: argparse.Namespace) -> int:
    try:
        view = _control(args.data_dir, {"op": "status"}, timeout=10.0)
    except DaemonUnreachable:
        view = offline_status(args.data_dir)
    print(json.dumps(view, indent=2, sort_keys=True))
    return _EXIT_OK


def _stop(args: argparse.Namespace) -> int:
    try:
        _control(args.data_dir, {"op": "shutdown"}, timeout=10.0)
    except DaemonUnreachable as exc:
        print(f"cpns gateway stop: {exc}", file=sys.stderr)
        return _EXIT_UNREACHABLE
    print("gateway daemon stopping")
    return _EXIT_OK


# -- parser ------------------------------------------------------------------------------


def _add_password(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True, help="CPNS User ID owning the PN GW (and PNE)")
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the user's password from one line of stdin instead of prompting",
    )
    parser.add_argument(
        "--realm",
        default="cpns",
        help="password realm the server uses for the password key (default: cpns)",
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``gateway`` command group."""
    gateway = subparsers.add_parser(
        "gateway",
        help="PN Gateway: enrol, run the daemon, assign EUKeys to PNEs",
        description=(
            "The PN Gateway (PN GW). Typical use:\n"
            "  cpns gateway enroll --data-dir D --entity-id gw-1 --server https://host:8443 \\\n"
            "       --ca server-cert.pem --user alice     # once: the PN GW gets its EUKey\n"
            "  cpns gateway run --data-dir D               # the daemon (PAN + server link)\n"
            "  cpns gateway assign --data-dir D --pne pne-1 --user alice --wait 30\n"
            "                                              # EUKey for a PNE without UI (003)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = gateway.add_subparsers(dest="gateway_command", metavar="COMMAND", required=True)

    p = cmds.add_parser(
        "enroll",
        help="obtain this PN GW's own EUKey with the user's password (004 §5.x.1)",
        description=(
            "Enrol the PN GW with the CPNS Server: prove the owner's User ID and password "
            "and receive the gateway's EUKey, which is stored sealed in the data directory "
            "and later authenticates every request (HTTP Digest). Writes gateway.toml so "
            "that the other commands need only --data-dir. The password never leaves "
            "this process: only a key derived from it is used."
        ),
    )
    add_data_dir(p, _DEFAULT_DIR)
    p.add_argument("--entity-id", required=True, help="this gateway's Entity ID")
    p.add_argument("--server", required=True, help="CPNS Server base URL, https://host:port")
    p.add_argument(
        "--ca", required=True, help="the server's certificate (PEM); the only one trusted"
    )
    p.add_argument(
        "--server-id", default="cpns-server", help="the server's Entity ID (default cpns-server)"
    )
    p.add_argument(
        "--pan-host", default="127.0.0.1", help="PAN listen address to configure (127.0.0.1)"
    )
    p.add_argument(
        "--pan-port",
        type=int,
        default=DEFAULT_PAN_PORT,
        help=f"PAN TCP port to configure (default {DEFAULT_PAN_PORT}; 0: a free port picked "
        "at the first start and kept for every later start)",
    )
    _add_password(p)
    add_log_format(p)
    p.set_defaults(func=_enroll)

    p = cmds.add_parser(
        "run",
        help="run the PN GW daemon until SIGTERM/SIGINT",
        description=(
            "Run the PN GW daemon: the PAN listener (PNEs attach here: the configured port, "
            f"{DEFAULT_PAN_PORT} by default, the same after every restart; the bound port is "
            "also written to <data-dir>/gateway.port), the link to the CPNS Server (HTTPS + "
            "Digest) and the control socket <data-dir>/control.sock used by 'assign' and "
            "'status'. Requests and key sets survive restarts: pending work resumes."
        ),
    )
    add_data_dir(p, _DEFAULT_DIR)
    p.add_argument(
        "--pan-port",
        type=int,
        help="override the configured PAN TCP port for this run (0: the remembered free port)",
    )
    p.add_argument("--pan-host", help="override the PAN listen address")
    add_log_format(p)
    p.set_defaults(func=_run)

    p = cmds.add_parser(
        "assign",
        help="assign an EUKey to a PNE without UI via its Temporary Key (003)",
        description=(
            "Ask the running daemon to obtain an EUKey set for a PNE without UI from the "
            "CPNS Server (the user's password proves the user) and deliver EUKey_1 to the "
            "PNE sealed under its Temporary Key. Exit 0 when the server assigned the key "
            "(delivered, or stored until the PNE attaches), 3 when a party refused (the "
            "status is printed), 4 when the daemon or the server cannot be reached, 5 when "
            "--wait ran out before the PNE proved receipt with its new key (only such a "
            "proof counts: unauthenticated answers on the PAN are reported, not believed)."
        ),
    )
    add_data_dir(p, _DEFAULT_DIR)
    p.add_argument("--pne", required=True, help="the PNE's Entity ID")
    p.add_argument(
        "--claim-code",
        metavar="CODE",
        help=(
            "the claim code printed on the PNE's label (XXXX-XXXX-XXXX-XXXX); without it "
            "the code is read from the line after the password with --password-stdin, or "
            "asked for. It proves you hold the device: the Entity ID alone claims nothing. "
            "Empty: no label, which only re-assigns a PNE of yours whose TK the TK-based "
            "authentications have ratcheted (its label code can no longer be checked)"
        ),
    )
    _add_password(p)
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for the PNE to acknowledge its key (default: do not wait)",
    )
    p.add_argument("--json", action="store_true", help="print the daemon's JSON reply")
    p.set_defaults(func=_assign)

    p = cmds.add_parser(
        "status",
        help="show the gateway's PNEs and their key state (no secrets)",
        description=(
            "Print, as JSON, the gateway's Entity ID and for each PNE the stage of its "
            "assignment, the key index and whether it was delivered. Asks the running "
            "daemon, or reads the key store if the daemon is not running."
        ),
    )
    add_data_dir(p, _DEFAULT_DIR)
    p.set_defaults(func=_status)

    p = cmds.add_parser("stop", help="ask the running daemon to shut down gracefully")
    add_data_dir(p, _DEFAULT_DIR)
    p.set_defaults(func=_stop)
