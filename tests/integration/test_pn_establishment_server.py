"""PN Establishment against a real ``cpns server`` process (002 §7.5.4, 000 §7.5), on
both back ends: the PNEs get their credentials the real ways (a 003 chain through the PN
GW daemon, a with-UI enrolment through its relay or directly), then a test-side PN GW and
its PNEs (tests/pn_client.py, the project's own machines) run both halves of the
establishment over real HTTPS + Digest as gw-alice, and ``cpns admin pn show`` lists
the PN."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from tests.integration.conftest import PASSWORD, Net
from tests.pn_client import PNGateway, Run

from cpns.crypto.kdf import password_key
from cpns.errors import ErrorCode
from cpns.gateway.upstream import ServerClient
from cpns.messages.codec import encode
from cpns.messages.model import AuthenticateResponse, Message
from cpns.protocol.key_assignment import claim_code
from cpns.protocol.user_key_assignment import EUKeyReceived, UserKeyAssignmentClient
from cpns.runtime import SystemRandom, wall_time
from cpns.store.masterkey import write_private_file
from cpns.types import EntityKind

pytestmark = pytest.mark.integration

GW = "gw-alice"
SERVER = "cpns-server"
PN = "pn-alice-home"
TK_PNES = ("pne-1", "pne-2", "pne-3", "pne-4")
UI_PNES = ("ui-1", "ui-2", "ui-3", "ui-4")


def _show(run: Net, entity_id: str) -> dict[str, Any]:
    out = run.net.cpns(
        "admin",
        "entity",
        "show",
        entity_id,
        "--show-secrets",
        "--data-dir",
        str(run.net.server_dir),
    ).stdout
    shown: dict[str, Any] = json.loads(out)
    return shown


def _import_tks(run: Net, tks: dict[str, bytes]) -> None:
    """More manufacturer TK records (``cpns admin tk import``), with their claim codes."""
    path = run.net.base / "more-tk.csv"
    lines = ["entity_id,tk", *(f"{e},{tk.hex()}" for e, tk in tks.items())]
    write_private_file(path, ("\n".join(lines) + "\n").encode(), overwrite=True)
    run.net.cpns(
        "admin", "tk", "import", str(path), "--data-dir", str(run.net.server_dir), "--quiet"
    )
    for entity_id, tk in tks.items():
        run.net.claim_codes[entity_id] = claim_code(tk, entity_id)
        run.tk[entity_id] = tk


async def _enrol_directly(run: Net, pne_ids: tuple[str, ...]) -> None:
    """004 §5.x.1 enrolment of PNEs with UI sent straight to the server (no Digest)."""
    key = password_key(PASSWORD, realm="cpns", user_id="alice")
    rng = SystemRandom()
    async with ServerClient(
        server_url=run.url, ca_file=run.net.ca_file, entity_id="unenrolled", eukey=None
    ) as client:
        for pne_id in pne_ids:
            machine = UserKeyAssignmentClient(
                entity_id=pne_id, entity_kind=EntityKind.PNE, server_id=SERVER, rng=rng
            )
            machine.start(user_id="alice", password_key=key, now=wall_time())
            [request] = machine.messages_to_send()
            events = machine.receive(await client.exchange(request))
            assert any(isinstance(e, EUKeyReceived) for e in events), events


def _credentials(run: Net, tk_pnes: tuple[str, ...], ui_pnes: tuple[str, ...]) -> PNGateway:
    """Give every PNE its credential the real way, then a test-side gw-alice holding what
    the PN GW holds (its EUKey; each TK PNE's TK and chain) and the PNEs theirs (read
    back with ``cpns admin entity show --show-secrets``). The first UI PNE enrols with
    ``cpns device enroll`` through the PN GW daemon's relay, the others directly."""
    net = run.net
    extra = {p: SystemRandom().token_bytes(32) for p in tk_pnes if p not in run.tk}
    if extra:
        _import_tks(run, extra)
    for pne_id in tk_pnes:
        result = net.assign(pne_id=pne_id, user_id="alice", password=PASSWORD, wait=0)
        assert result.returncode == 0, result.stdout + result.stderr
    if ui_pnes:
        result = net.enroll_device(
            ui_pnes[0],
            entity_id=ui_pnes[0],
            user_id="alice",
            password=PASSWORD,
            pan_port=run.pan_port,
            check=True,
        )
        assert "OK" in result.stdout
        asyncio.run(_enrol_directly(run, ui_pnes[1:]))
    gw_eukey = bytes.fromhex(_show(run, GW)["eukeys"][0])
    client = PNGateway(
        gw_id=GW,
        gw_eukey=gw_eukey,
        server_id=SERVER,
        exchange=_unbound_exchange,
        rng=SystemRandom(),
    )
    for pne_id in tk_pnes:
        shown = _show(run, pne_id)
        assert shown["assigned_via"] == GW
        chain = [bytes.fromhex(k) for k in shown["eukeys"]]
        client.add_tk_pne(pne_id, tk=bytes.fromhex(shown["tk"]), chain=chain)
    for pne_id in ui_pnes:
        shown = _show(run, pne_id)
        assert shown["assigned_via"] is None
        client.add_rand_hash_pne(pne_id, bytes.fromhex(shown["eukeys"][0]))
    return client


async def _unbound_exchange(message: Message) -> Message:  # pragma: no cover - replaced
    raise AssertionError("the exchange is bound in _establish")


def _establish(
    run: Net, client: PNGateway, originator: str, invited: tuple[str, ...], **kw: Any
) -> Run:
    """One establishment with gw-alice's Digest credentials over HTTPS."""

    async def go() -> Run:
        async with ServerClient(
            server_url=run.url,
            ca_file=run.net.ca_file,
            entity_id=GW,
            eukey=client.gw_eukey,
            retries=8,
            backoff=0.25,
        ) as upstream:
            client.exchange = upstream.exchange
            return await client.establish(originator, invited, pn_id=PN, **kw)

    return asyncio.run(go())


def _pn(run: Net) -> dict[str, Any]:
    out = run.net.cpns(
        "admin", "pn", "show", PN, "--json", "--data-dir", str(run.net.server_dir)
    ).stdout
    shown: dict[str, Any] = json.loads(out)
    return shown


def test_eight_pnes_of_both_kinds_establish_a_pn_with_the_real_server(running: Net) -> None:
    """002 §7.5.4.2-3 and 000 §7.5.2-3 over HTTPS + Digest: 4 PNEs with a 003 chain (TK
    flow) and 4 enrolled with UI (rand/hash flow, one through the PN GW's relay) establish
    one PN; every PNE checks the server's answer and joins; the LocalEUKey one PNE asked
    for reaches it and the PN GW alike, and no key reaches the server's log; ``cpns admin
    pn show`` lists the 8 members with their flows, and the server's TK state of each TK
    PNE moved one step."""
    client = _credentials(running, TK_PNES, UI_PNES)
    everyone = (*UI_PNES, *TK_PNES)
    run = _establish(running, client, everyone[0], everyone[1:], local=("ui-2", "pne-3"))

    assert run.server_status() == dict.fromkeys(everyone, ErrorCode.OK)
    for pne_id in everyone:
        assert run.joined(pne_id) is not None, pne_id
    secrets = [client.gw_eukey]
    for pne_id in ("ui-2", "pne-3"):
        local = client.devices[pne_id].local_eukey
        assert local is not None
        assert client.local[(pne_id, PN)] == local
        secrets.append(local)
    for pne_id in everyone:
        joined = run.joined(pne_id)
        assert joined is not None
        secrets.append(joined.sk)
    server_log = running.net.log("server")
    assert "pn-establishment-complete" in server_log or PN in server_log
    for secret in secrets:  # no key, LocalEUKey or session key in the server's log
        assert secret.hex() not in server_log

    shown = _pn(running)
    assert (shown["gateway_id"], shown["owner"]) == (GW, "alice")
    assert shown["failed"] == []
    assert {m["pne_id"]: (m["flow"], m["status"]) for m in shown["members"]} == {
        **{p: ("rand-hash", "member") for p in UI_PNES},
        **{p: ("tk", "member") for p in TK_PNES},
    }
    listed = json.loads(
        running.net.cpns(
            "admin", "pn", "list", "--json", "--data-dir", str(running.net.server_dir)
        ).stdout
    )
    assert [(p["pn_id"], p["members"]) for p in listed] == [(PN, 8)]
    entity = _show(running, "pne-1")
    assert entity["key_index"] == 2

    # A second establishment continues from the stored state (TK step 1, EUKey_2).
    again = _establish(running, client, "ui-1", ("pne-1", "pne-2"))
    assert again.server_status() == dict.fromkeys(("ui-1", "pne-1", "pne-2"), ErrorCode.OK)
    assert _show(running, "pne-1")["key_index"] == 3


def test_a_server_restarted_between_the_halves_finishes_the_establishment(running: Net) -> None:
    """Issue 6 item 2: the server process is stopped after its AUTHENTICATE Request and a
    new one started before the AUTHENTICATE Response; the new process takes the second
    half from the stored pending establishment, and both PNEs join."""
    client = _credentials(running, ("pne-1",), ("ui-1",))
    restarted: list[bool] = []

    async def restart(message: Message) -> None:
        if isinstance(message, AuthenticateResponse):
            await asyncio.to_thread(running.net.stop, "server")
            await asyncio.to_thread(running.net.start_server)
            restarted.append(True)

    run = _establish(running, client, "ui-1", ("pne-1",), before_upstream=restart)
    assert restarted == [True]
    assert run.server_status() == {"ui-1": ErrorCode.OK, "pne-1": ErrorCode.OK}
    assert run.joined("ui-1") is not None
    assert run.joined("pne-1") is not None
    members = {m["pne_id"]: m["flow"] for m in _pn(running)["members"]}
    assert members == {"ui-1": "rand-hash", "pne-1": "tk"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_one_authenticate_response_at_two_server_processes_commits_once(running: Net) -> None:
    """Our rule (docs/procedures/pn-establishment.md, "In the CPNS Server"): a second
    ``cpns server run`` over the same database; the PN GW's AUTHENTICATE Response reaches
    both processes at once (a retry sent elsewhere while the first is in flight). Whatever
    the interleaving, both answer the same SETUP Response, the establishment is finished
    once, and the TK PNE's chain index moved exactly one step."""
    net = running.net
    client = _credentials(running, ("pne-1",), ("ui-1",))
    port = _free_port()
    net.start(
        "server-2",
        "server",
        "run",
        "--data-dir",
        str(net.server_dir),
        env={"CPNS_SERVER_PORT": str(port)},
    )

    def upstream(url: str) -> ServerClient:
        return ServerClient(
            server_url=url, ca_file=net.ca_file, entity_id=GW, eukey=client.gw_eukey, retries=8
        )

    async def go() -> tuple[Run, list[Message]]:
        copies: list[Message] = []
        async with upstream(running.url) as first, upstream(f"https://localhost:{port}") as second:
            for _ in range(300):  # the second process is up when it answers /healthz
                if await second.healthz():
                    break
                await asyncio.sleep(0.1)

            async def exchange(message: Message) -> Message:
                if not isinstance(message, AuthenticateResponse):
                    return await first.exchange(message)
                copies.extend(
                    await asyncio.gather(first.exchange(message), second.exchange(message))
                )
                return copies[0]

            client.exchange = exchange
            return await client.establish("ui-1", ("pne-1",), pn_id=PN), copies

    run, copies = asyncio.run(go())
    assert len(copies) == 2
    assert encode(copies[0]) == encode(copies[1])
    assert run.server_status() == {"ui-1": ErrorCode.OK, "pne-1": ErrorCode.OK}
    assert _show(running, "pne-1")["key_index"] == 2
    assert {m["pne_id"] for m in _pn(running)["members"]} == {"ui-1", "pne-1"}
