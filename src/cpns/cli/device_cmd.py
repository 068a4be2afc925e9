"""``cpns device ...``: provision a PNE with its factory TK, run its agent, show status.

``init`` plays the manufacturer (Entity ID + Temporary Key into the sealed store);
``run`` is the PNE agent attaching to a PN GW over the PAN link; ``status`` shows the
key index held, never a key. Exit codes follow :mod:`cpns.cli.main`; ``run --once``
adds 5 for "connected but no key arrived before --timeout".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Final

from cpns.cli._common import add_data_dir
from cpns.device.agent import DeviceAgent, device_status, init_device
from cpns.errors import ConfigurationError
from cpns.runtime import run_event_loop

__all__ = ["parse_hostport", "register"]

_DEFAULT_DIR: Final = "cpns-device"
_EXIT_USAGE: Final = 2


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


def _read_tk(args: argparse.Namespace) -> bytes:
    if args.tk_hex is not None:
        text = args.tk_hex.strip()
    else:
        raw = Path(args.tk_file).read_bytes()
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            return raw  # a binary TK file
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ConfigurationError("the TK must be hex (or a raw binary file)") from None


def _init(args: argparse.Namespace) -> int:
    try:
        tk = _read_tk(args)
    except OSError as exc:
        print(f"cpns device init: cannot read {args.tk_file}: {exc}", file=sys.stderr)
        return _EXIT_USAGE
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
    agent = DeviceAgent(args.data_dir, host, port)
    return run_event_loop(_run_agent(agent, args.once, args.timeout))


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
            "  cpns device init --data-dir D --entity-id pne-1 --tk-hex <factory TK>\n"
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
            "(TK, 16..64 bytes) go into a sealed key store in the data directory. The "
            "same TK must be imported on the CPNS Server ('cpns admin tk import')."
        ),
    )
    add_data_dir(p, _DEFAULT_DIR)
    p.add_argument("--entity-id", required=True, help="the PNE's Entity ID")
    tk = p.add_mutually_exclusive_group(required=True)
    tk.add_argument("--tk-hex", metavar="HEX", help="the TK as hex digits")
    tk.add_argument("--tk-file", metavar="FILE", help="file holding the TK (hex text or raw)")
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
    p.add_argument("--log-json", action="store_true", help="log JSON lines")
    p.set_defaults(func=_run)

    p = cmds.add_parser(
        "status",
        help="show the PNE's Entity ID and key index (no secrets)",
        description="Print, as JSON, the Entity ID, whether an EUKey is held and its index.",
    )
    add_data_dir(p, _DEFAULT_DIR)
    p.set_defaults(func=_status)
