"""``cpns demo``: EUKey assignment and PN Establishment on loopback, with real processes.

It does what the README's walk-through does by hand: a CPNS Server with a user and
manufacturer TK records, a PN GW that enrols with the user's password (004 §5.x.1), then
``--pnes N`` PNEs (default 3) of both credential kinds: PNEs without UI get an EUKey chain
through the PN GW (003), sealed under their TK; PNEs with UI enrol with the user's
password through the PN GW's relay (004 §5.x.1, ``cpns device enroll``). Then the first
PNE establishes one PN with all the others (002 §7.5.4 rand/hash for the PNEs with UI,
000 TK-based for the others), asking for a LocalEUKey, which it then uses to
authenticate with its PN GW. Every party is a separate ``cpns`` process with its own
data directory; at the end the demo shows each party's view (the server's PN inventory,
the PN GW's routing table, each PNE's status) and the server's audit trail. ``--json``
prints the same summary as one JSON document instead.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

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

    # With --json the narrative goes to stderr and stdout carries one JSON document.
    console = Console(stderr=True) if args.json else Console()
    if args.pnes < 1 or args.pnes > 64:
        console.print("[red]--pnes must be 1..64[/red]")
        return 2
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="cpns-demo-"))
    if args.dir and base.exists() and any(base.iterdir()):
        console.print(f"[red]{base} is not empty; give an empty or new directory[/red]")
        return 2
    user, password = "alice", secrets.token_urlsafe(12)
    gw_id, pne_id = "phone-gw-01", "headset-01"
    pnes = _demo_pnes(args.pnes, first=pne_id)
    tks = {p: secrets.token_bytes(32) for p, kind in pnes if kind == "tk"}
    tk = tks[pne_id]
    net = LocalDeployment(base)
    pn_id = "pn-alice-home"

    def step(text: str) -> None:
        console.print(f"[bold cyan]>[/bold cyan] {text}")

    with net.running():
        step(
            f"CPNS Server: init in {net.server_dir}, user [b]{user}[/b], "
            f"manufacturer TK record for [b]{pne_id}[/b]"
        )
        net.init_server(users=[(user, password)], tk_records=sorted(tks.items()))
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
        for other, kind in pnes[1:]:
            if kind == "tk":
                step(f"PNE [b]{other}[/b] (no UI): the same EUKey assignment (003)")
                net.init_device(other, entity_id=other, tk=tks[other])
                net.start_device(other, pan_port=pan_port, once=True, timeout=60)
                got = net.assign(pne_id=other, user_id=user, password=password, wait=30)
                if got.returncode != 0 or net.wait(other, timeout=60) != 0:
                    console.print(f"[red]assignment of {other} failed[/red]\n{net.log(other)}")
                    return 1
            else:
                step(
                    f"PNE [b]{other}[/b] (with UI) enrols with {user}'s password through the "
                    "PN GW's relay (004 §5.x.1): the PN GW cannot open its EUKey"
                )
                got = net.enroll_device(
                    other, user_id=user, password=password, pan_port=pan_port, entity_id=other
                )
                if got.returncode != 0:
                    console.print(f"[red]enrolment of {other} failed[/red]\n{got.stdout}")
                    return 1
        names = [p for p, _ in pnes]
        step(f"Every PNE agent runs attached to {gw_id} (PAN is not a Secure PAN here)")
        for name in names:
            net.start_device(
                name, pan_port=pan_port, once=False, timeout=600, extra=["--gateway-id", gw_id]
            )
        net.wait_attached(names)
        step(
            f"{pne_id} establishes PN [b]{pn_id}[/b] inviting {len(names) - 1} PNE(s), with a "
            "LocalEUKey (002 §7.5.4; TK-based 000 for PNEs without UI)"
        )
        _, established = net.establish(
            pne_id, pn_id=pn_id, invite=names[1:], local_eukey=True, timeout=60
        )
        step(
            f"{established.get('status')}: "
            + ", ".join(
                f"{m['pne_id']} {'joined' if m['status'] == 'OK' else m['status']}"
                f" ({m['flow'] or '-'})"
                for m in established.get("members", [])
            )
            + f"; LocalEUKey authentication with the PN GW: {established.get('local')}"
        )
        pn_server = net.cpns(
            "admin", "pn", "show", pn_id, "--json", "--data-dir", str(net.server_dir), check=False
        )
        pn_view = json.loads(pn_server.stdout) if pn_server.returncode == 0 else None
        pn_gateway = net.gateway_status()
        pn_devices = {name: net.device_status(name) for name in names}

        server_view = json.loads(
            net.cpns("admin", "entity", "list", "--json", "--data-dir", str(net.server_dir)).stdout
        )
        gw_view = pn_gateway
        audit = [
            json.loads(line)
            for line in net.cpns(
                "admin", "audit", "--data-dir", str(net.server_dir)
            ).stdout.splitlines()
        ]

    summary = _summary(
        pn_id=pn_id,
        gw_id=gw_id,
        kinds=dict(pnes),
        established=established,
        server=pn_view,
        gateway=pn_gateway,
        devices=pn_devices,
    )
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
        return 0 if summary["outcome"] == "OK" else 1
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
    est_flow = established.get("flow_id")
    est_logs = [*(base / f"{n}.log" for n in names), base / "gw.log", base / "server.log"]
    if est_flow and all(p.exists() for p in est_logs):
        from cpns.cli.trace_cmd import draw, read_lines

        est_lines = list(read_lines(est_logs, est_flow))
        if est_lines:
            console.print(
                f"\nThe PN Establishment as the PNEs, the PN GW and the server logged it "
                f"(cpns trace {est_flow} {' '.join(p.name for p in est_logs)}):"
            )
            console.print(draw(est_flow, est_lines), soft_wrap=True, markup=False, highlight=False)
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
        pns = ", ".join(m["pn_id"] for m in p.get("pns", []))
        held = (
            f"TK + EUKey set stored, EUKey_{p['key_index']} {p['stage']}"
            f"{', TK step ' + str(p['tk_step']) if p.get('tk_step') else ''}"
            if p["stage"] != "none"
            else "no key set (enrolled with UI: the PN GW holds none of its keys)"
        )
        table.add_row("PN GW", f"{p['pne_id']}: {held}{'; PN ' + pns if pns else ''}")
    for name, view in pn_devices.items():
        tk_flow = (
            f", TK flow at step {view['tk_step']} with EUKey_{view['tk_key_index']}"
            if "tk_step" in view
            else ""
        )
        pns = "; ".join(
            f"PN {m['pn_id']} {m['status']} ({m['flow']}, session key"
            f"{', LocalEUKey + local session key' if m['local_session'] else ''})"
            for m in view.get("pns", [])
        )
        table.add_row(
            "PNE",
            f"{name}: credential {view.get('credential')}, EUKey_{view.get('key_index')}"
            f"{tk_flow}; {pns}",
        )
    console.print(table)
    pn_table = Table(
        "party", "PNE", "credential", "flow", "outcome", title=f"PN {pn_id}: each party's view"
    )
    for m in summary["members"]:
        pn_table.add_row(
            "PNE (originator)" if m["pne_id"] == pne_id else "PNE",
            m["pne_id"],
            m["credential"],
            m["flow"] or "-",
            m["status"],
        )
    server_pn = summary["views"]["server"]
    if server_pn is not None:
        for m in server_pn.get("members", []):
            pn_table.add_row("CPNS Server", m.get("pne_id"), "", m.get("flow") or "-", "member")
        for m in server_pn.get("failed", []):
            pn_table.add_row(
                "CPNS Server", m.get("pne_id"), "", m.get("flow") or "-", str(m.get("status"))
            )
    members = summary["views"]["gateway"].get(pn_id, [])
    pn_table.add_row("PN GW", ", ".join(members), "", "", f"{len(members)} member(s) routed")
    console.print(pn_table)
    console.print(
        f"PN {pn_id}: {summary['outcome']}; LocalEUKey authentication of {pne_id} with "
        f"{gw_id}: {summary['local_eukey']['status']}"
    )
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


def _demo_pnes(n: int, *, first: str) -> list[tuple[str, str]]:
    """N PNEs of both credential kinds: the first without UI ("tk", 003), then with UI
    ("ui", 004 through the relay) and without UI by turns."""
    pnes = [(first, "tk")]
    for i in range(1, n):
        pnes.append((f"watch-{i:02d}", "ui") if i % 2 else (f"sensor-{i:02d}", "tk"))
    return pnes


def _summary(
    *,
    pn_id: str,
    gw_id: str,
    kinds: dict[str, str],
    established: dict[str, Any],
    server: dict[str, Any] | None,
    gateway: dict[str, Any],
    devices: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The demo's outcome as one JSON-able document: members, the flow each used, outcome,
    and each party's view (no secrets: the views hold none)."""
    members = [
        {
            "pne_id": m["pne_id"],
            "credential": kinds.get(m["pne_id"], "?"),
            "flow": m["flow"],
            "status": m["status"],
            "joined": m["status"] == "OK",
        }
        for m in established.get("members", [])
    ]
    originator = next(iter(kinds))
    return {
        "pn_id": pn_id,
        "gateway_id": gw_id,
        "originator": originator,
        "outcome": established.get("status"),
        "est_id": established.get("est_id"),
        "members": members,
        "local_eukey": {"pne_id": originator, "status": established.get("local")},
        "views": {
            "server": server,
            "gateway": gateway.get("pns", {}),
            "pnes": {name: view.get("pns", []) for name, view in devices.items()},
        },
    }


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` command."""
    demo = sub.add_parser(
        "demo",
        help="run server, PN GW and PNEs locally through EUKey assignment and PN Establishment",
        description="Start a CPNS Server, a PN GW daemon and PNE agents as separate "
        "processes on loopback; give the PN GW and N PNEs of both kinds their EUKeys "
        "(003 for PNEs without UI, 004 through the PN GW for PNEs with UI), establish one "
        "PN with all of them (002 §7.5.4, 000), and show each party's view and the "
        "audit trail.",
    )
    demo.add_argument(
        "--pnes", type=int, default=3, metavar="N", help="how many PNEs (1..64, default 3)"
    )
    demo.add_argument(
        "--json",
        action="store_true",
        help="print the summary (members, the flow each used, outcome, each party's view) "
        "as one JSON document on stdout",
    )
    demo.add_argument(
        "--dir",
        help="keep data directories and logs here (default: a "
        "temporary directory, removed afterwards)",
    )
    demo.set_defaults(func=_run)
