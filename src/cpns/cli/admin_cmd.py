"""``cpns admin``: users, manufacturer TK records, entities, the PN inventory and the
audit trail.

Works directly on the server's database (``--data-dir`` of the server), safely while the
server runs. Secrets are never printed unless ``--show-secrets`` is given.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from cpns.cli._common import add_data_dir, add_progress, progress_bars, read_password
from cpns.errors import ConfigurationError
from cpns.protocol.key_assignment import claim_code
from cpns.records import EntityRecord

__all__ = ["register"]


def _open(args: argparse.Namespace) -> tuple[Any, Any]:
    from cpns.server.config import load_server_config
    from cpns.server.main import open_store

    if not (args.data_dir / "server.toml").exists():
        raise ConfigurationError(
            f"{args.data_dir} is not a server data directory (run 'cpns server init' first)"
        )
    config = load_server_config(args.data_dir)
    return config, open_store(config)


def _user_add(args: argparse.Namespace) -> int:
    from cpns.server.admin import add_user

    password = read_password(args.password_stdin, confirm=True)
    config, store = _open(args)
    try:
        add_user(store, args.user_id, password, realm=config.realm)
    finally:
        store.close()
    print(f"user {args.user_id} added")
    return 0


def _user_list(args: argparse.Namespace) -> int:
    _, store = _open(args)
    try:
        for user in store.list_users():
            print(f"{user.user_id}{'  (disabled)' if user.disabled else ''}")
    finally:
        store.close()
    return 0


def _tk_import(args: argparse.Namespace) -> int:
    from cpns.server.admin import import_tk_csv

    config, store = _open(args)
    try:
        with progress_bars(args) as progress:
            count = import_tk_csv(store, args.file, progress=progress, server_id=config.server_id)
    finally:
        store.close()
    print(f"imported {count} TK record(s) from {args.file}")
    return 0


def _user_import(args: argparse.Namespace) -> int:
    from cpns.server.admin import import_users_csv

    if args.workers is not None and not 1 <= args.workers <= 256:
        raise ConfigurationError("--workers takes 1 to 256")
    config, store = _open(args)
    try:
        with progress_bars(args) as progress:
            count = import_users_csv(
                store, args.file, realm=config.realm, progress=progress, workers=args.workers
            )
    finally:
        store.close()
    print(f"imported {count} user(s) from {args.file}")
    return 0


def _config(args: argparse.Namespace) -> Any:
    from cpns.server.config import load_server_config

    if not (args.data_dir / "server.toml").exists():
        raise ConfigurationError(
            f"{args.data_dir} is not a server data directory (run 'cpns server init' first)"
        )
    return load_server_config(args.data_dir)


def _backup(args: argparse.Namespace) -> int:
    from cpns.store.dump import backup

    config, store = _open(args)
    try:
        with progress_bars(args) as progress:
            info = backup(
                store,
                args.file,
                server_id=config.server_id,
                realm=config.realm,
                progress=progress,
            )
    finally:
        store.close()
    rows = sum(info.rows.values())
    print(
        f"backup {args.file}: {rows} row(s) of {len(info.rows)} table(s), schema "
        f"{info.schema_version}, sealed under master key {info.master_key_id} "
        "(back the master key up separately: the backup is useless without it)"
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    from cpns.server.main import master_key
    from cpns.store.dump import restore

    config = _config(args)
    with progress_bars(args) as progress:
        info = restore(
            config.store_target(),
            args.file,
            master_key=master_key(config),
            server_id=config.server_id,
            realm=config.realm,
            progress=progress,
        )
    rows = sum(info.rows.values())
    print(
        f"restored {rows} row(s) of {len(info.rows)} table(s) from {args.file} "
        f"(made on {info.backend}, master key {info.master_key_id})"
    )
    return 0


def _rotate(args: argparse.Namespace) -> int:
    import os

    from cpns.store.rotation import rotate

    config = _config(args)
    if os.environ.get("CPNS_MASTER_KEY"):
        raise ConfigurationError(
            "CPNS_MASTER_KEY is set: rotation replaces the key FILE; re-seal with the key "
            "in a file (unset CPNS_MASTER_KEY), then hand the new key to the environment"
        )
    key_file = config.path(config.master_key_file)
    with progress_bars(args) as progress:
        old, new, counts = rotate(config.store_target(), key_file, progress=progress)
    print(
        f"master key rotated from {old.key_id} to {new.key_id}: {sum(counts.values())} "
        f"sealed value(s) re-sealed; {key_file} holds the new key. Back it up now; "
        "backups made before are sealed under the old key."
    )
    return 0


def _entity_view(entity: EntityRecord, show_secrets: bool) -> dict[str, object]:
    view: dict[str, object] = {
        "entity_id": entity.entity_id,
        "kind": entity.kind.name,
        "owner": entity.owner,
        "key_index": entity.key_index,
        "keys": len(entity.eukeys),
        "assigned_via": entity.assigned_via,
        "assigned_at": entity.assigned_at,
        "revoked": entity.revoked,
        "epoch": entity.epoch,
    }
    if show_secrets:
        view["eukeys"] = [k.hex() for k in entity.eukeys]
    return view


def _entity_list(args: argparse.Namespace) -> int:
    _, store = _open(args)
    try:
        entities = store.list_entities(owner=args.owner)
    finally:
        store.close()
    if args.json:
        print(json.dumps([_entity_view(e, False) for e in entities], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("Entity ID", "kind", "owner", "key index", "via", "revoked")
    for e in entities:
        table.add_row(
            e.entity_id,
            e.kind.name,
            e.owner,
            f"{e.key_index}/{len(e.eukeys)}",
            e.assigned_via or "-",
            "yes" if e.revoked else "no",
        )
    Console().print(table)
    return 0


def _entity_show(args: argparse.Namespace) -> int:
    _, store = _open(args)
    try:
        entity = store.get_entity(args.entity_id)
        tk = store.get_tk(args.entity_id)
    finally:
        store.close()
    if entity is None and tk is None:
        raise ConfigurationError(f"no entity {args.entity_id!r}")
    view: dict[str, object] = (
        _entity_view(entity, args.show_secrets)
        if entity
        else {"entity_id": args.entity_id, "assigned": False}
    )
    view["tk_record"] = tk is not None
    if tk is not None:
        view["tk_step"] = tk.tk_step  # the TK ratchet step (000); 0: the manufacturer's TK
    if tk is not None and args.show_secrets:
        view["tk"] = tk.tk.hex()
        # D-003-10: what the manufacturer prints on the PNE's label. It derives from the
        # manufacturer's TK, which a ratcheted record no longer holds (D-003-13).
        if tk.tk_step == 0:
            view["claim_code"] = claim_code(tk.tk, args.entity_id)
    print(json.dumps(view, indent=2))
    return 0


def _entity_revoke(args: argparse.Namespace) -> int:
    from cpns.server.admin import set_revoked

    _, store = _open(args)
    try:
        set_revoked(store, args.entity_id, not args.restore)
    finally:
        store.close()
    print(f"{args.entity_id} {'restored' if args.restore else 'revoked'}")
    return 0


def _when(at: int) -> str:
    """Epoch seconds as UTC ``YYYY-MM-DD HH:MM:SSZ`` for the text tables."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))


def _pn_list(args: argparse.Namespace) -> int:
    from cpns.server.admin import pn_view

    _, store = _open(args)
    try:
        pns = store.list_pns(owner=args.owner, gateway=args.gateway)
    finally:
        store.close()
    if args.json:
        print(json.dumps([pn_view(pn) for pn in pns], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("PN ID", "PN GW", "owner", "members", "failed", "updated")
    for pn in pns:
        table.add_row(
            pn.pn_id,
            pn.gateway_id,
            pn.owner,
            str(len(pn.joined)),
            str(len(pn.failed)),
            _when(pn.updated_at),
        )
    Console().print(table)
    return 0


def _pn_show(args: argparse.Namespace) -> int:
    from cpns.server.admin import pn_view

    _, store = _open(args)
    try:
        pn = store.get_pn(args.pn_id)
    finally:
        store.close()
    if pn is None:
        raise ConfigurationError(f"no PN {args.pn_id!r}")
    if args.json:
        print(json.dumps(pn_view(pn, detail=True), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"PN {pn.pn_id}: PN GW {pn.gateway_id}, owner {pn.owner}, "
        f"{len(pn.joined)} member(s), {len(pn.failed)} failed; "
        f"created {_when(pn.created_at)}, updated {_when(pn.updated_at)}",
        highlight=False,
    )
    table = Table("PNE ID", "member", "flow", "status", "when")
    for m in (*pn.joined, *pn.failed):
        table.add_row(m.pne_id, "yes" if m.joined else "no", m.flow or "-", m.status, _when(m.at))
    console.print(table)
    return 0


def _flow_arg(text: str) -> str:
    """A flow ID argument: 16 hex digits (any case), normalised to lowercase."""
    from cpns.flow import flow_bytes

    value = text.strip().lower()
    if flow_bytes(value) is None:
        raise argparse.ArgumentTypeError(f"not a flow ID (16 hex digits): {text!r}")
    return value


def _audit(args: argparse.Namespace) -> int:
    from cpns.server.admin import purge_audit

    config, store = _open(args)
    try:
        if args.purge:
            gone = purge_audit(store, days=config.audit_retention_days)
            print(f"purged {gone} audit event(s) older than {config.audit_retention_days} days")
            return 0
        events = store.audit_events(limit=args.limit)
    finally:
        store.close()
    if args.flow is not None:
        events = [e for e in events if e.flow_id == args.flow]
    for e in events:
        print(
            json.dumps(
                {
                    "at": e.at,
                    "actor": e.actor,
                    "procedure": e.procedure,
                    "outcome": e.outcome,
                    "entity": e.entity_id,
                    "user": e.user_id,
                    "hop": e.hop,
                    "correlation_id": e.correlation_id,
                    "flow": e.flow_id,
                    "detail": e.detail,
                    "count": e.count,
                    "source": e.source,
                }
            )
        )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``admin`` command group."""
    admin = sub.add_parser(
        "admin",
        help="administer users, TK records, entities and the PN inventory",
        description="Administration of the CPNS Server's database.",
    )
    groups = admin.add_subparsers(dest="admin_group", metavar="GROUP")

    user = groups.add_parser("user", help="CPNS Users").add_subparsers(metavar="SUBCOMMAND")
    add = user.add_parser("add", help="register a CPNS User (asks for the password)")
    add_data_dir(add, "cpns-server")
    add.add_argument("user_id", help="the CPNS User ID")
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from one line of standard input",
    )
    add.set_defaults(func=_user_add)
    uimp = user.add_parser(
        "import",
        help="register users from CSV (all or nothing)",
        description="Register many CPNS Users at once. The CSV has a header "
        "'user_id,password' (passwords, turned into password keys with scrypt in a process "
        "pool: about 40 ms of CPU each) or 'user_id,password_key' (the 64-hex-digit password "
        "keys precomputed by the provisioning system, see docs/operations.md; fast). A bad "
        "line is reported with its number and nothing is imported.",
    )
    add_data_dir(uimp, "cpns-server")
    uimp.add_argument("file", type=Path, help="CSV file")
    uimp.add_argument(
        "--workers", type=int, default=None, help="processes hashing passwords (default: CPUs)"
    )
    add_progress(uimp)
    uimp.set_defaults(func=_user_import)
    lst = user.add_parser("list", help="list users")
    add_data_dir(lst, "cpns-server")
    lst.set_defaults(func=_user_list)

    tk = groups.add_parser("tk", help="manufacturer Temporary Key records")
    tkc = tk.add_subparsers(metavar="SUBCOMMAND")
    imp = tkc.add_parser(
        "import",
        help="import TK records from CSV (all or nothing)",
        description="Import manufacturer TK records. The CSV has a header 'entity_id,tk' and "
        "one record per line, the TK in hex (16 to 64 bytes). A bad line is "
        "reported with its number and nothing is imported.",
    )
    add_data_dir(imp, "cpns-server")
    imp.add_argument("file", type=Path, help="CSV file")
    add_progress(imp)
    imp.set_defaults(func=_tk_import)

    ent = groups.add_parser("entity", help="PNEs and PN GWs").add_subparsers(metavar="SUBCOMMAND")
    el = ent.add_parser("list", help="list entities (no secrets)")
    add_data_dir(el, "cpns-server")
    el.add_argument("--owner", help="only this user's entities")
    el.add_argument("--json", action="store_true", help="JSON output")
    el.set_defaults(func=_entity_list)
    es = ent.add_parser("show", help="show one entity")
    add_data_dir(es, "cpns-server")
    es.add_argument("entity_id")
    es.add_argument(
        "--show-secrets",
        action="store_true",
        help="also print EUKeys and the TK (handle the output with care)",
    )
    es.set_defaults(func=_entity_show)
    er = ent.add_parser("revoke", help="revoke an entity (it can no longer authenticate)")
    add_data_dir(er, "cpns-server")
    er.add_argument("entity_id")
    er.add_argument("--restore", action="store_true", help="undo a revocation")
    er.set_defaults(func=_entity_revoke)

    pn = groups.add_parser(
        "pn",
        help="the PN inventory (Personal Networks, their members and failures)",
        description="The Personal Networks the server recorded at each PN Establishment: "
        "PN ID, PN GW, owner, each PNE's flow (rand-hash or tk) and outcome. A PNE whose "
        "latest attempt failed is listed with its status and is not a member.",
    ).add_subparsers(metavar="SUBCOMMAND")
    pl = pn.add_parser(
        "list",
        help="list PNs with their member and failure counts",
        description="List the PNs (PN ID, PN GW, owner, members, failed, last update in "
        "UTC). Exit codes: 0 listed (possibly none); 2 not a server data directory or the "
        "database cannot be read.",
    )
    add_data_dir(pl, "cpns-server")
    pl.add_argument("--owner", metavar="USER", help="only this user's PNs")
    pl.add_argument("--gateway", metavar="GW_ID", help="only the PNs of this PN GW")
    pl.add_argument("--json", action="store_true", help="JSON output")
    pl.set_defaults(func=_pn_list)
    ps = pn.add_parser(
        "show",
        help="show one PN: each member and failure with its flow, status and time",
        description="Show one PN: each member and each failed PNE with its flow, status "
        "(member, or the error code of its failure) and when. Exit codes: 0 shown; 2 no "
        "such PN, not a server data directory, or the database cannot be read.",
    )
    add_data_dir(ps, "cpns-server")
    ps.add_argument("pn_id", metavar="PN_ID")
    ps.add_argument("--json", action="store_true", help="JSON output")
    ps.set_defaults(func=_pn_show)

    bk = groups.add_parser(
        "backup",
        help="write a backup of the whole database to a new file",
        description="Write every table, read from one consistent snapshot, to a new 0600 "
        "file (never overwritten), with a checksum. Secrets stay sealed under the master "
        "key, which is NOT in the backup: back it up separately. Safe while the server runs.",
    )
    add_data_dir(bk, "cpns-server")
    bk.add_argument("file", type=Path, help="the backup file to create")
    add_progress(bk)
    bk.set_defaults(func=_backup)
    rs = groups.add_parser(
        "restore",
        help="load a backup into the empty database of a new data directory",
        description="Load a backup made by 'cpns admin backup' (on SQLite or PostgreSQL) "
        "into the empty database of a data directory made by 'cpns server init', whose "
        "master key must be the one the backup was sealed under (copy the saved master.key "
        "in first). All or nothing. Stop the server of that data directory first.",
    )
    add_data_dir(rs, "cpns-server")
    rs.add_argument("file", type=Path, help="the backup file")
    add_progress(rs)
    rs.set_defaults(func=_restore)

    mk = groups.add_parser("master-key", help="the master key sealing the database's secrets")
    mkc = mk.add_subparsers(metavar="SUBCOMMAND")
    rot = mkc.add_parser(
        "rotate",
        help="re-seal every secret under a new master key (stop the server first)",
        description="Write a new master key beside the old one, re-seal every secret "
        "under it in one database transaction, then move it over the key file. A crash at "
        "any point leaves a server that starts with one of the two keys "
        "(docs/operations.md). Stop every server process of the database first.",
    )
    add_data_dir(rot, "cpns-server")
    add_progress(rot)
    rot.set_defaults(func=_rotate)

    au = groups.add_parser("audit", help="show the newest audit events (JSON lines)")
    add_data_dir(au, "cpns-server")
    au.add_argument("--limit", type=int, default=50)
    au.add_argument(
        "--flow",
        type=_flow_arg,
        metavar="ID",
        help="only the events of this flow (16 hex digits, as in the logs; among the newest "
        "--limit events)",
    )
    au.add_argument(
        "--purge",
        action="store_true",
        help="delete events older than audit_retention_days instead (the server does it too)",
    )
    au.set_defaults(func=_audit)
