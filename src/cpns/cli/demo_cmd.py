"""``cpns demo``: the whole of EUKey assignment on loopback, with real processes.

It does what the README's walk-through does by hand: a CPNS Server with a user and a
manufacturer TK record, a PN GW that enrols with the user's password (004 §5.x.1) and
then obtains an EUKey chain for a PNE without UI (003), and the PNE that receives its
EUKey sealed under its TK. Every party is a separate ``cpns`` process with its own data
directory; at the end the demo shows each party's view and the server's audit trail.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import tempfile
from pathlib import Path

__all__ = ["register"]

_SEQUENCE = """\
   PNE ({pne})            PN GW ({gw})                 CPNS Server
      |                         |  Step 0: TLS 1.3 (server cert)  |
      |                         |  + HTTP Digest(EUKey_GW), rspauth|
      |                         |--- EUKey Assignment Request ---->|  ID, User ID, Time,
      |                         |    (txid {tx})       |  Hash(AuthData)
      |                         |<-- EUKey Assignment Response ----|  {status}: E_EUKey_GW(TK,
      |                         |    [stored TK + {n} EUKeys]      |  [EUKey_1..EUKey_{n}])
      |<- EUKey Assignment Notif.|                                 |
      |   E_TK(EUKey_1)         |                                  |
      |-- Acknowledgement ----->|  HMAC(EUKey_1)                   |
  [EUKey_1 stored]              |                                  |
"""


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from cpns.localnet import LocalDeployment

    console = Console()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cpns-demo-"))
    if args.dir and base.exists() and any(base.iterdir()):
        console.print(f"[red]{base} is not empty; give an empty or new directory[/red]")
        return 2
    user, password = "alice", secrets.token_urlsafe(12)
    gw_id, pne_id = "phone-gw-01", "headset-01"
    tk = secrets.token_bytes(32)
    net = LocalDeployment(base)

    def step(text: str) -> None:
        console.print(f"[bold cyan]>[/bold cyan] {text}")

    with net.running():
        step(
            f"CPNS Server: init in {net.server_dir}, user [b]{user}[/b], "
            f"manufacturer TK record for [b]{pne_id}[/b]"
        )
        net.init_server(users=[(user, password)], tk_records=[(pne_id, tk)])
        url = net.start_server()
        step(f"CPNS Server running at {url} (TLS 1.3, SQLite)")
        step(f"PN GW [b]{gw_id}[/b] enrols: {user}'s password -> its own EUKey (004 §5.x.1)")
        net.enroll_gateway(entity_id=gw_id, user_id=user, password=password, server_url=url)
        pan_port = net.start_gateway()
        step(f"PN GW daemon running, PAN listener on 127.0.0.1:{pan_port}")
        step(f"PNE [b]{pne_id}[/b] (no UI) powers on with its factory TK and connects")
        net.init_device(pne_id, entity_id=pne_id, tk=tk)
        net.start_device(pne_id, pan_port=pan_port, once=True, timeout=60)
        step(f"The user asks the PN GW to assign an EUKey to {pne_id} (003 §7.4.2.2)")
        result = net.assign(pne_id=pne_id, user_id=user, password=password, wait=30)
        if result.returncode != 0:
            console.print(f"[red]assignment failed:[/red] {result.stdout}{result.stderr}")
            return result.returncode or 1
        code = net.wait(pne_id, timeout=60)
        if code != 0:
            console.print(f"[red]the PNE agent exited {code}[/red]\n{net.log(pne_id)}")
            return 1
        step("[green]done[/green]: the PNE holds EUKey_1, the PN GW the set, the server the chain")

        server_view = json.loads(
            net.cpns("admin", "entity", "list", "--json", "--data-dir", str(net.server_dir)).stdout
        )
        gw_view = json.loads(
            net.cpns("gateway", "status", "--data-dir", str(net.gateway_dir())).stdout
        )
        dev_view = json.loads(
            net.cpns("device", "status", "--data-dir", str(net.device_dir(pne_id))).stdout
        )
        audit = [
            json.loads(line)
            for line in net.cpns(
                "admin", "audit", "--data-dir", str(net.server_dir)
            ).stdout.splitlines()
        ]

    tx = next(
        (a["correlation_id"] for a in audit if a["procedure"] == "eukey-assignment-tk-003"), "?"
    )
    n = next((e["keys"] for e in server_view if e["entity_id"] == pne_id), "?")
    console.print()
    console.print(_SEQUENCE.format(pne=pne_id, gw=gw_id, tx=str(tx)[:12], status="OK", n=n))
    table = Table("party", "what it holds now (no secrets shown)", title="Each party's view")
    for e in server_view:
        table.add_row(
            "CPNS Server",
            f"{e['entity_id']} ({e['kind']}, owner {e['owner']}): "
            f"EUKey {e['key_index']} of {e['keys']}",
        )
    table.add_row("PN GW", json.dumps(gw_view, sort_keys=True))
    table.add_row("PNE", json.dumps(dev_view, sort_keys=True))
    console.print(table)
    trail = Table("outcome", "procedure", "actor", "entity", "txid", title="Server audit trail")
    for a in reversed(audit):
        trail.add_row(
            a["outcome"],
            a["procedure"],
            a["actor"],
            a["entity"] or "-",
            (a["correlation_id"] or "-")[:12],
        )
    console.print(trail)
    if args.dir:
        console.print(f"data directories and logs kept in {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` command."""
    demo = sub.add_parser(
        "demo",
        help="run server, PN GW and PNE locally through EUKey assignment",
        description="Start a CPNS Server, a PN GW daemon and a PNE agent as separate "
        "processes on loopback, take the PN GW and a PNE without UI through "
        "EUKey assignment, and show each party's view and the audit trail.",
    )
    demo.add_argument(
        "--dir",
        help="keep data directories and logs here (default: a "
        "temporary directory, removed afterwards)",
    )
    demo.set_defaults(func=_run)
