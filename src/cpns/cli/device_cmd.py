"""``cpns device ...``: provision a PNE with its factory TK, run its agent, enrol a PNE
with UI, show status.

``init`` plays the manufacturer (Entity ID + Temporary Key into the sealed store);
``run`` is the PNE agent attaching to a PN GW over the PAN link; ``enroll`` is a PNE with
UI getting its own EUKey with its user's password, through the PN GW (004 §5.x.1: the
password is turned into the password key here and never leaves this process);
``establish`` asks the running agent (its control socket) to start a PN Establishment
as the originating PNE (002 §7.5.4) and prints each member's outcome; ``status`` shows
the credential kind, key index and PNs joined, never a key. Exit codes follow
:mod:`cpns.cli.main`; ``run --once`` adds 5 for "connected but no key arrived before
--timeout".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import signal
import socket
import stat
import string
import sys
from pathlib import Path
from typing import Final

from cpns.cli._common import add_data_dir, add_log_format, read_password
from cpns.crypto.kdf import password_key
from cpns.device.agent import DeviceAgent, device_status, init_device
from cpns.device.enrolment import DEFAULT_SERVER_ID, enroll_device
from cpns.device.establishment import AGENT_SOCKET
from cpns.errors import ConfigurationError, ErrorCode, ProcedureRejected
from cpns.runtime import run_event_loop

__all__ = [
    "TK_INPUT_MAX",
    "parse_hostport",
    "parse_tk",
    "read_tk_file",
    "read_tk_stdin",
    "register",
]

_DEFAULT_DIR: Final = "cpns-device"
_EXIT_USAGE: Final = 2
_EXIT_REFUSED: Final = 3
_EXIT_UNREACHABLE: Final = 4


def parse_hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port).

    Raises:
        ConfigurationError: not of that form, or the port is not 1..65535.
    """
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigurationError(f"expected HOST:PORT, not {value!r}")
    return host, int(port)


#: Longest TK input read from a file or stdin, bytes (128 hex digits and some whitespace).
TK_INPUT_MAX: Final = 1024


def parse_tk(raw: bytes) -> bytes:
    """The TK from its text form: 32 to 128 hex digits (16 to 64 bytes), nothing else but
    surrounding whitespace (a trailing newline is fine).

    Hex text is the one format, the same as the manufacturer's CSV the server imports: a
    raw binary file would be ambiguous (64 raw bytes could be a 64-byte TK or the hex of a
    32-byte one). Errors never repeat the input: it may be the secret itself.

    Raises:
        ConfigurationError: not ASCII hex of a whole number of bytes in 16..64.
    """
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ConfigurationError(
            "the TK must be given as 32 to 128 hex digits (this input is not ASCII text)"
        ) from None
    if not text or len(text) % 2 or any(c not in string.hexdigits for c in text):
        raise ConfigurationError(
            f"the TK must be 32 to 128 hex digits on one line (got {len(text)} characters "
            "that are not all hex digits, or an odd number of them)"
        )
    tk = bytes.fromhex(text)
    if not 16 <= len(tk) <= 64:
        raise ConfigurationError(f"the TK must be 16 to 64 bytes, not {len(tk)}")
    return tk


def read_tk_file(path: Path) -> bytes:
    """The TK from a file that only its owner can read or write (mode 0600 or 0400).

    Raises:
        ConfigurationError: the file cannot be read, is not a regular file, is open to the
            group or to others (``chmod 600`` it), is too long, or does not hold a TK.
    """
    try:
        with path.open("rb") as stream:
            info = os.fstat(stream.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ConfigurationError(f"{path} is not a regular file")
            if info.st_mode & 0o077:
                raise ConfigurationError(
                    f"{path} is open to other users (mode {stat.S_IMODE(info.st_mode):04o}); "
                    f"a TK is a secret: 'chmod 600 {path}' and keep it that way"
                )
            raw = stream.read(TK_INPUT_MAX + 1)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the TK file {path}: {exc.strerror}") from None
    if len(raw) > TK_INPUT_MAX:
        raise ConfigurationError(f"{path} is too long to hold a TK")
    return parse_tk(raw)


def read_tk_stdin() -> bytes:
    """The TK from one line of standard input (a prompt without echo on a terminal)."""
    if sys.stdin.isatty():
        line = getpass.getpass("Temporary Key (hex): ")
    else:
        line = sys.stdin.readline(TK_INPUT_MAX + 1)
    if len(line) > TK_INPUT_MAX:
        raise ConfigurationError("the TK line on standard input is too long")
    return parse_tk(line.encode("utf-8", "replace"))


def _init(args: argparse.Namespace) -> int:
    if args.tk_hex is not None:
        print(
            "cpns device init: --tk-hex is no longer accepted: a TK on the command line is "
            "visible to every user in the process list. Use --tk-file FILE (mode 0600) or "
            "--tk-stdin.",
            file=sys.stderr,
        )
        return _EXIT_USAGE
    tk = read_tk_file(args.tk_file) if args.tk_file is not None else read_tk_stdin()
    init_device(args.data_dir, args.entity_id, tk, force=args.force)
    print(f"PNE {args.entity_id} initialised in {args.data_dir}")
    return 0


async def _run_agent(agent: DeviceAgent, once: bool, timeout: float | None) -> int:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, agent.request_stop)
            installed.append(sig)
    try:
        return await agent.run(once=once, timeout=timeout)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _run(args: argparse.Namespace) -> int:
    host, port = parse_hostport(args.gateway)
    if args.timeout is not None and args.timeout <= 0:
        print("cpns device run: --timeout must be > 0", file=sys.stderr)
        return _EXIT_USAGE
    agent = DeviceAgent(
        args.data_dir,
        host,
        port,
        gateway_id=args.gateway_id,
        server_id=args.server_id,
        secure_pan=args.secure_pan,
        want_local_eukey=args.local_eukey,
    )
    return run_event_loop(_run_agent(agent, args.once, args.timeout))


def _agent_call(data_dir: Path, request: dict[str, object], timeout: float) -> dict[str, object]:
    """One JSON request on the agent's control socket; ConnectionError if none answers."""
    path = data_dir / AGENT_SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            with sock.makefile("rb") as stream:
                line = stream.readline()
        except OSError as exc:
            raise ConnectionError(f"no PNE agent answers on {path} ({exc})") from None
    if not line:
        raise ConnectionError(f"the PNE agent closed {path} without answering")
    reply = json.loads(line)
    if not isinstance(reply, dict):
        raise ConnectionError("the PNE agent sent a malformed reply")
    return reply


def _establish(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        print("cpns device establish: --timeout must be > 0", file=sys.stderr)
        return _EXIT_USAGE
    request: dict[str, object] = {
        "op": "establish",
        "pn_id": args.pn_id,
        "invite": list(args.invite),
        "local_eukey": args.local_eukey,
        "timeout": args.timeout,
    }
    try:
        reply = _agent_call(args.data_dir, request, args.timeout + 30)
    except ConnectionError as exc:
        print(f"cpns device establish: {exc} (start 'cpns device run' first)", file=sys.stderr)
        return _EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(reply, sort_keys=True))
    else:
        status = reply.get("status")
        print(
            f"{status}: PN {args.pn_id}"
            + (f" (establishment {reply['est_id']})" if reply.get("est_id") else "")
            + (f" at {reply['hop']}: {reply.get('reason')}" if reply.get("hop") else "")
            + (f": {reply['error']}" if reply.get("error") else "")
            + (f" (flow {reply['flow_id']})" if reply.get("flow_id") else "")
        )
        members = reply.get("members")
        for m in members if isinstance(members, list) else []:
            flow = f" ({m['flow']} flow)" if m.get("flow") else ""
            verdict = "joined" if m["status"] == "OK" else f"not joined: {m['status']}"
            print(f"  {m['pne_id']}: {verdict}{flow}")
        if reply.get("local") is not None:
            print(f"  LocalEUKey authentication with the PN GW: {reply['local']}")
    if reply.get("ok"):
        return 0
    if reply.get("status") in ("NOT_READY", "TIMEOUT", "UPSTREAM_UNAVAILABLE"):
        return _EXIT_UNREACHABLE
    return _EXIT_REFUSED


def _enroll(args: argparse.Namespace) -> int:
    host, port = parse_hostport(args.gateway)
    if args.timeout <= 0 or args.tries < 1:
        print("cpns device enroll: --timeout must be > 0 and --tries >= 1", file=sys.stderr)
        return _EXIT_USAGE
    password = read_password(args.password_stdin)
    key = password_key(password, realm=args.realm, user_id=args.user)
    del password
    try:
        result = run_event_loop(
            enroll_device(
                args.data_dir,
                host,
                port,
                user_id=args.user,
                password_key=key,
                entity_id=args.entity_id,
                server_id=args.server_id,
                per_try_timeout=args.timeout,
                tries=args.tries,
            )
        )
    except ProcedureRejected as exc:
        name = exc.code.name if isinstance(exc.code, ErrorCode) else str(exc.code)
        if args.json:
            print(json.dumps({"ok": False, "status": name, "hop": exc.hop}, sort_keys=True))
        else:
            print(f"{name}: enrolment refused at {exc.hop} ({exc.reason})")
        return _EXIT_UNREACHABLE if exc.code is ErrorCode.UPSTREAM_UNAVAILABLE else _EXIT_REFUSED
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "status": "OK",
                    "entity_id": result.entity_id,
                    "user_id": result.user_id,
                    "txid": result.txid,
                    "flow": result.flow,
                    "tries": result.tries,
                },
                sort_keys=True,
            )
        )
    else:
        print(
            f"OK: PNE {result.entity_id} enrolled for user {result.user_id}; its EUKey is "
            f"stored (credential ui) (txid {result.txid}, flow {result.flow})"
        )
    return 0


def _status(args: argparse.Namespace) -> int:
    print(json.dumps(device_status(args.data_dir), indent=2, sort_keys=True))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``device`` command group."""
    device = subparsers.add_parser(
        "device",
        help="PNE agent: provision with a TK, attach to a PN GW, take the EUKey",
        description=(
            "A PNE without UI. Typical use:\n"
            "  cpns device init --data-dir D --entity-id pne-1 --tk-file tk.hex  # mode 0600\n"
            "  cpns device run --data-dir D --gateway 127.0.0.1:<PAN port> --once\n"
            "The PN GW delivers EUKey_1 sealed under the TK once the user ran\n"
            "'cpns gateway assign --pne pne-1 ...' (003)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = device.add_subparsers(dest="device_command", metavar="COMMAND", required=True)

    p = cmds.add_parser(
        "init",
        help="store the PNE's Entity ID and factory Temporary Key",
        description=(
            "Provision the PNE as its manufacturer would: its Entity ID and Temporary Key "
            "(TK, 16..64 bytes, given as hex digits in a file only its owner can read, or on "
            "standard input; never on the command line, where the process list shows it) go "
            "into a sealed key store in the data directory. The same TK must be imported on "
            "the CPNS Server ('cpns admin tk import')."
        ),
    )
    add_data_dir(p, _DEFAULT_DIR)
    p.add_argument("--entity-id", required=True, help="the PNE's Entity ID")
    tk = p.add_mutually_exclusive_group()
    tk.add_argument(
        "--tk-file",
        type=Path,
        metavar="FILE",
        help="file holding the TK as 32..128 hex digits; only its owner may read it (chmod 600)",
    )
    tk.add_argument(
        "--tk-stdin",
        action="store_true",
        help="read the TK (hex digits) from one line of standard input (the default)",
    )
    tk.add_argument("--tk-hex", help=argparse.SUPPRESS)  # refused with an explanation
    p.add_argument(
        "--force", action="store_true", help="replace an existing store (drops its EUKey)"
    )
    p.set_defaults(func=_init)

    p = cmds.add_parser(
        "run",
        help="attach to a PN GW and install the EUKey it delivers",
        description=(
            "Connect to the PN GW's PAN port, announce this PNE and install any EUKey "
            "Notification addressed to it (opened with the TK; stored before it is "
            "acknowledged). Reconnects with backoff if the gateway goes away. Exit codes "
            "with --once: 0 key installed and acknowledged, 3 only refused notifications, "
            "4 gateway never reached, 5 no key before --timeout."
        ),
    )
    add_data_dir(p, _DEFAULT_DIR)
    p.add_argument("--gateway", required=True, metavar="HOST:PORT", help="the PN GW's PAN port")
    p.add_argument("--once", action="store_true", help="exit once a key is installed")
    p.add_argument(
        "--timeout", type=float, metavar="S", help="give up after S seconds (default: never)"
    )
    p.add_argument(
        "--gateway-id",
        help="the PN GW's Entity ID (PN Establishment; default: the one that assigned the "
        "key, else learned from its first invitation)",
    )
    p.add_argument(
        "--server-id",
        help=f"the CPNS Server's Entity ID (default: the enrolment's, else {DEFAULT_SERVER_ID})",
    )
    p.add_argument(
        "--secure-pan",
        action="store_true",
        help="the PAN is a Secure PAN: skip the LocalEUKey authentication after a PN "
        "Establishment (002 §7.5.4)",
    )
    p.add_argument(
        "--local-eukey",
        action="store_true",
        help="ask for a LocalEUKey when invited to a PN",
    )
    add_log_format(p)
    p.set_defaults(func=_run)

    p = cmds.add_parser(
        "establish",
        help="establish a PN as the originating PNE (002 §7.5.4), through the running agent",
        description=(
            "Ask the running agent ('cpns device run' on the same data directory, attached "
            "to its PN GW) to send the SETUP Request of a PN Establishment: this PNE and "
            "each --invite PNE authenticate mutually with the CPNS Server through the PN "
            "GW (rand/hash for a PNE enrolled with UI, TK-based for one assigned without "
            "UI) and share a fresh session key with it. Prints each member's outcome. With "
            "--local-eukey the PNE also gets a LocalEUKey shared with its PN GW and, on a "
            "PAN that is not a Secure PAN, authenticates with the PN GW using it. Exit "
            "codes: 0 this PNE joined, 3 refused, 4 no agent, not attached, or no answer."
        ),
    )
    add_data_dir(p, _DEFAULT_DIR)
    p.add_argument("--pn-id", required=True, help="the PN ID")
    p.add_argument(
        "--invite",
        action="append",
        default=[],
        metavar="PNE_ID",
        help="a PNE to invite (repeat; each must be attached to the same PN GW)",
    )
    p.add_argument("--local-eukey", action="store_true", help="ask for a LocalEUKey")
    p.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="seconds to wait (default 60)"
    )
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(func=_establish)

    p = cmds.add_parser(
        "enroll",
        help="a PNE with UI gets its own EUKey with its user's password, via the PN GW (004)",
        description=(
            "A PNE with UI and no WAN access gets its own EUKey (004 §5.x.1): the user's "
            "User ID and password (asked for, or one line of stdin with --password-stdin) "
            "prove the user; the request goes over the PAN to the PN GW, which relays it "
            "to the CPNS Server and relays the answer back. The password never leaves this "
            "process, and the PN GW cannot open the EUKey. The EUKey is stored sealed in "
            "the data directory (credential kind 'ui'). A lost answer is retried with the "
            "same request (--tries). Stop 'cpns device run' on the same data directory "
            "first. Exit codes: 0 enrolled, 3 refused (the status and the hop that "
            "refused are printed), 4 the PN GW or the server could not be reached."
        ),
    )
    add_data_dir(p, _DEFAULT_DIR)
    p.add_argument("--gateway", required=True, metavar="HOST:PORT", help="the PN GW's PAN port")
    p.add_argument(
        "--entity-id",
        help="this PNE's Entity ID (creates the device store if there is none; a PNE with "
        "UI needs no factory TK)",
    )
    p.add_argument("--user", required=True, help="CPNS User ID owning the PNE")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the user's password from one line of stdin instead of prompting",
    )
    p.add_argument(
        "--realm",
        default="cpns",
        help="password realm the server uses for the password key (default: cpns)",
    )
    p.add_argument(
        "--server-id",
        default=DEFAULT_SERVER_ID,
        help=f"the CPNS Server's Entity ID (default {DEFAULT_SERVER_ID})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds to wait for the answer on one PAN link (default 30)",
    )
    p.add_argument(
        "--tries", type=int, default=3, help="PAN links to try before giving up (default 3)"
    )
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    add_log_format(p)
    p.set_defaults(func=_enroll)

    p = cmds.add_parser(
        "status",
        help="show the PNE's Entity ID, credential kind, key index and PNs (no secrets)",
        description=(
            "Print, as JSON, the Entity ID, whether an EUKey is held, its credential kind "
            "('ui': its own, from the user's password; 'tk': delivered by a PN GW under "
            "the TK), its index, the TK flow's step, and the PNs joined (flow, "
            "establishment, whether a session key, a LocalEUKey and a local session key "
            "are held)."
        ),
    )
    add_data_dir(p, _DEFAULT_DIR)
    p.set_defaults(func=_status)
