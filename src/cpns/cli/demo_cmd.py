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

from cpns.cli.diagram import arrow as _arrow
from cpns.cli.diagram import header, lifelines
from cpns.cli.diagram import under as _under

__all__ = ["register", "sequence_diagram"]


def sequence_diagram(*, pne: str, gw: str, server: str, txid: str, n: int | str) -> str:
    """The flow the demo just ran, drawn the way the seeds draw their figures."""
    rows = [
        *header({"PNE": pne, "GW": gw, "SRV": server}),
        lifelines(),
        _arrow("GW", "SRV", "TLS 1.3, server certificate", "003 step 0 / 004 §5.x.2"),
        _arrow("GW", "SRV", "HTTP Digest(EUKey_GW)"),
        _arrow("SRV", "GW", "rspauth"),
        _arrow("GW", "SRV", "EUKey Assignment Request", "003 §7.4.2.1.1.1"),
        _under("GW", "SRV", "PNE ID, User ID, Time,", f"txid {txid}"),
        _under("GW", "SRV", "Hash(AuthData)"),
        _under("GW", "SRV", "", f"[server: verify, SeedPNE, store EUKey_{n}..EUKey_1]"),
        _arrow("SRV", "GW", "EUKey Assignment Response", "003 §7.4.2.1.1.2"),
        _under("GW", "SRV", f"OK, E_EUKey_GW(TK, set of {n})"),
        _under("GW", "SRV", "[PN GW stores TK + set]"),
        _arrow("GW", "PNE", "EUKey Assignment Notif.", "003 §7.4.2.1.1.3"),
        _under("PNE", "GW", "E_TK(EUKey_1)"),
        _arrow("PNE", "GW", "Ack, HMAC(EUKey_1)"),
        _under("PNE", "GW", "[PNE stores EUKey_1]"),
    ]
    return "\n".join(rows)


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
        step(
            f"The user asks the PN GW to assign an EUKey to {pne_id} (003 §7.4.2.2), typing "
            f"the claim code from its label, {net.claim_codes[pne_id]} (D-003-10)"
        )
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
    diagram = sequence_diagram(pne=pne_id, gw=gw_id, server="cpns-server", txid=str(tx)[:12], n=n)
    console.print(diagram, soft_wrap=True, markup=False, highlight=False)
    flow = next((a.get("flow") for a in audit if a["procedure"] == "eukey-assignment-tk-003"), None)
    logs = [base / f"{name}.log" for name in (pne_id, "gw", "server")]
    if flow and all(p.exists() for p in logs):
        from cpns.cli.trace_cmd import draw, read_lines

        lines = list(read_lines(logs, flow))
        if lines:
            console.print(
                f"\nThe same flow as the three parties logged it "
                f"(cpns trace {flow} {' '.join(p.name for p in logs)}):"
            )
            console.print(draw(flow, lines), soft_wrap=True, markup=False, highlight=False)
    table = Table("party", "what it holds now (no secrets shown)", title="Each party's view")
    for e in server_view:
        table.add_row(
            "CPNS Server",
            f"{e['entity_id']} ({e['kind']}, owner {e['owner']}): "
            f"EUKey {e['key_index']} of {e['keys']}",
        )
    table.add_row(
        "PN GW",
        f"{gw_view.get('entity_id')} (owner {gw_view.get('user_id')}): own EUKey, "
        f"server {gw_view.get('server_url')}",
    )
    for p in gw_view.get("pnes", []):
        table.add_row(
            "PN GW",
            f"{p['pne_id']}: TK + EUKey set stored, EUKey_{p['key_index']} {p['stage']}",
        )
    table.add_row(
        "PNE",
        f"{dev_view.get('entity_id')}: EUKey_{dev_view.get('key_index')} "
        f"from {dev_view.get('gateway_id')}",
    )
    console.print(table)
    trail = Table(
        "outcome", "procedure", "actor", "entity", "txid", "flow", title="Server audit trail"
    )
    for a in reversed(audit):
        trail.add_row(
            a["outcome"],
            a["procedure"],
            a["actor"],
            a["entity"] or "-",
            (a["correlation_id"] or "-")[:12],
            a.get("flow") or "-",
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
