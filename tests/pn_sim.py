"""A deterministic simulator of PN Establishment (issue 6 item 9, N3): the server, PN GW
and PNE machines of both flows (rand/hash 002 §7.5.4, TK 000 §7.5) wired in memory under
a seeded scheduler that drops, duplicates, delays (hence reorders) messages at every hop,
crashes parties and lets a PAN adversary tamper, forge and replay messages.

What each party keeps across a crash (its stored facts) and what it loses:

* CPNS Server: a real store (:class:`~cpns.store.memory.MemoryStore`, or an
  :class:`~cpns.store.sql.SQLStore` in a temporary directory, closed and reopened at each
  restart). Each request runs the way the service runs it: a stored reply answers a retry
  (same txid, same bytes); otherwise a fresh machine built from the store, and every fact
  its events carry written with the reply in ONE transaction; a reused txid with other
  content is REPLAY. It purges what expired before each request; a pending establishment
  lives the default 300 s or, in half the schedules, 8 or 20 s. A crash falls before the
  commit (nothing written, no reply) or after it (the reply is lost).
* PN GW: its records (the TK state and EUKey set of each TK-flow PNE, its LocalEUKeys),
  written when its machine reports them, before anything is sent; it loses its running
  establishments. Upstream it is an HTTP client: one open request at a time, resent
  unchanged (same txid) when no answer comes, ``UPSTREAM_UNAVAILABLE`` after the last try;
  an answer that does not match the open request is discarded. On the PAN it resends an
  unanswered PNInvite or AUTHENTICATE Request unchanged, then reports the PNE's timeout to
  its machine; it answers a retransmitted SETUP Request of a finished establishment with
  the SETUP Response it sent (kept in memory).
* PNE: its credential (EUKey, or TK state persisted on every ``PNETKUpdated``) and its
  LocalEUKey; it loses its machines. The originating PNE resends its SETUP Request
  unchanged until the SETUP Response; an invited PNE abandons an establishment that does
  not end in time. In half the schedules a PNE runs ONE establishment machine at a time
  (a new invitation supersedes an unfinished one), in the others one per invitation;
  each machine reads the stored TK state when it answers or confirms (``tk_lookup``). A
  PAN message goes to the machine of its transaction (a retry of the request it
  answered, or the request it waits for); any other message is dropped.

Rounds: one to three chaotic establishments (in 30% of them a second one, of another PN
and originator, overlaps), then one clean one with every PNE.

The adversary sits on the PAN (no Secure PAN): it flips a byte of a field, injects a
well-formed SETUP Response or PNEstablishmentNotify with a random hash_server and key
confirmation for a transaction it saw, or replays any PAN message it saw (earlier rounds
included). The upstream link is TLS + Digest: faults there are loss, duplication, delay.

Checks, at every step (SAFETY) and at the end of each round (LIVENESS):

* no PNE accepts a forged server: every ``PNEJoined`` has a committed server result OK for
  that PNE and establishment with the same SK; every LocalEUKey a PNE or the PN GW stores
  is the one the server generated for that PNE and establishment;
* no key outside its holders: no key (EUKey, TK at any step, LocalEUKey, SK) appears in
  the bytes of any message, and every sealed field of every honest message opens only
  under keys whose holders all hold the sealed key (tried with every key we track);
* stored state consistent: for a TK-flow PNE, server step s and index i against the PNE's
  stored (c, j, pending) and the PN GW's step g: ``c <= s <= c + 1``, ``g <= s``,
  ``j <= i <= j + 1`` (i = j + 1 only with the pending EUKey_{j+1}); every PNE the server
  recorded a member proved itself in that establishment, the stored PN inventory holds
  exactly the verdicts of each committed establishment, no PNE of another user or
  unknown PNE is ever a member, and no 003 re-assignment is asked for but for an
  exhausted chain (no PNE here is restored from a backup);
* every round ends (the event queue drains within a step budget) and the PN GW's machine
  reaches DONE or FAILED unless it crashed; after the chaotic rounds one clean
  establishment with every PNE makes every PNE a member (N1: nothing locks a PNE out).

Deterministic: one ``random.Random(seed)`` drives the scheduler, the adversary and the
world; the parties draw from :class:`tests.helpers.FixedRandom` seeded from it; the clock
is virtual. ``Simulation(seed).run()`` raises :class:`SimulationFailure` naming the seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpns.errors import AuthenticationFailed, ErrorCode
from cpns.messages.codec import decode, encode
from cpns.messages.constants import AuthFlow
from cpns.messages.model import (
    AuthChallenge,
    AuthenticateRequest,
    AuthenticateResponse,
    AuthProof,
    Message,
    PNEAuthenticateRequest,
    PNEAuthenticateResponse,
    PNEstablishmentNotify,
    PNEstablishRequest,
    PNInvite,
    PNSetupRequest,
    PNSetupResponse,
)
from cpns.protocol import tk_auth
from cpns.protocol._machine import Event, ProcedureFailed
from cpns.protocol.pn_establishment import (
    PENDING_TTL,
    EstablishmentLookups,
    EstablishmentPending,
    GatewayEstablishment,
    GatewayTKHolding,
    GatewayTKUpdated,
    InvitedPNE,
    LocalEUKeyStored,
    OriginatingPNE,
    PNEJoined,
    PNEstablished,
    PNEState,
    PNETKUpdated,
    ReassignmentRequested,
    ServerCompletion,
    ServerSetup,
    TKAdvanced,
)
from cpns.protocol.pne_auth import open_local_eukey
from cpns.records import (
    StoredReply,
    TKRecord,
    UserRecord,
)
from cpns.store.base import ServerStore, WriteTx
from cpns.store.masterkey import MasterKey
from cpns.store.memory import MemoryStore
from cpns.store.sql import SQLStore
from tests.pn_world import GW_ID, OWNER, PN_ID, SERVER_ID, PNEHolder, World

__all__ = ["CLEAN", "Faults", "SimServer", "Simulation", "SimulationFailure", "replay_hint"]

#: The PN GW's retransmission timer on the PAN and its tries before a PNE's timeout.
PAN_RTO, PAN_TRIES = 4.0, 3
#: The PN GW's HTTP timeout and tries before UPSTREAM_UNAVAILABLE.
UP_RTO, UP_TRIES = 5.0, 3
#: The originating PNE resends its SETUP Request this often, this many times.
PNE_RTO, PNE_TRIES = 10.0, 12
#: An invited PNE abandons an establishment that has not ended after this long.
PNE_ABANDON = 150.0
#: Events one round may take before it counts as a livelock.
STEP_BUDGET = 20_000
#: Another user's PNE and an ID the server does not know (refused, never members).
OTHER_USER_PNE, UNKNOWN_PNE = "pne-bob", "pne-ghost"
#: The PN of an establishment that overlaps another.
SECOND_PN_ID = "pn-alice-office"
_MASTER_KEY = bytes(range(32))


def replay_hint(seed: int) -> str:
    """The one-line command that replays one schedule."""
    return (
        f"CPNS_SIM_SEED={seed} .venv/bin/python -bb -m pytest "
        "tests/property/test_pn_simulator.py -q"
    )


class SimulationFailure(AssertionError):
    """A property failed in one schedule; the message names the seed and how to replay."""


@dataclass(frozen=True, slots=True)
class Faults:
    """Probabilities of the faults of a round (per message or per step)."""

    drop: float = 0.12
    duplicate: float = 0.08
    #: Extra delay, uniform in [0, delay] seconds (reorders messages).
    delay: float = 3.0
    #: The party handling a message crashes after persisting, before sending.
    crash: float = 0.02
    #: The PAN adversary acts on a message.
    adversary: float = 0.06


CLEAN = Faults(drop=0.0, duplicate=0.0, delay=0.0, crash=0.0, adversary=0.0)


# -- the server: the store, and each request run the way the service runs it ----------------


def persist(tx: WriteTx, events: list[Event], now: int) -> None:
    """Write the facts of the server machines' events (one transaction with the reply)."""
    for event in events:
        if isinstance(event, EstablishmentPending):
            tx.put_establishment(event.to_record())
        elif isinstance(event, TKAdvanced):
            tx.set_tk_state(
                event.pne_id, event.tk, event.tk_step, expected_step=event.expected_step
            )
            if event.key_index != event.expected_index:  # the chain's last key stays
                tx.set_key_index(event.pne_id, event.key_index, expected_index=event.expected_index)
        elif isinstance(event, PNEstablished):
            tx.record_pn(event.pn_id, event.gw_id, event.owner, now, event.members())
            tx.delete_establishment(event.gw_id, event.est_id)


class SimServer:
    """The CPNS Server over a store: :meth:`handle` runs one HTTP exchange of the PN GW."""

    def __init__(self, store: ServerStore, rng: Any, *, ttl: int = PENDING_TTL) -> None:
        self.store = store
        self.rng = rng
        #: Seconds a pending establishment lives (the server purges expired ones).
        self.ttl = ttl

    def lookups(self) -> EstablishmentLookups:
        """The machines' reads, from the store."""

        def tk_state(pne_id: str) -> tuple[bytes, int] | None:
            record = self.store.get_tk(pne_id)
            return (record.tk, record.tk_step) if record is not None else None

        return EstablishmentLookups(get_entity=self.store.get_entity, get_tk_state=tk_state)

    def handle(
        self, message: Message, now: int, *, crash: str | None = None
    ) -> tuple[Message | None, list[Event]]:
        """The reply to ``message`` (None if the server crashed) and the committed events.

        ``crash``: "before-commit" (nothing written, no reply) or "after-commit" (written,
        the reply lost)."""
        self.store.purge_expired(now=now)  # as the server's housekeeping does
        digest = hashlib.sha256(encode(message)).digest()
        stored = self.store.get_reply(message.src, message.txid)
        if stored is not None and stored.request_digest == digest:
            return (None if crash else decode(stored.reply)), []  # a retry: the same reply
        machine = self._machine(message, now)
        if machine is None:
            return None, []  # the HTTP layer answers an ErrorMessage: nothing to feed
        if stored is not None:  # the txid reused with other content
            machine.fail(ErrorCode.REPLAY, "transaction ID reused with other content", message)
            return (None if crash else machine.messages_to_send()[0]), []
        events = machine.receive(message)
        [reply] = machine.messages_to_send()
        if any(isinstance(e, ProcedureFailed) for e in events):
            return (None if crash else reply), []  # refusals are not stored (as the service)
        if crash == "before-commit":
            return None, []
        body = encode(reply)

        def write(tx: WriteTx) -> None:
            persist(tx, events, now)
            tx.put_reply(
                StoredReply(
                    requester=message.src,
                    txid=message.txid,
                    request_digest=digest,
                    reply=body,
                    created_at=now,
                )
            )

        self.store.write(write)
        return (None if crash else decode(body)), events

    def _machine(self, message: Message, now: int) -> ServerSetup | ServerCompletion | None:
        """A fresh machine for the request, built from the store (any process could)."""
        if isinstance(message, PNEstablishRequest):
            return ServerSetup(
                server_id=SERVER_ID,
                requester=message.src,
                lookups=self.lookups(),
                rng=self.rng,
                now=now,
                ttl=self.ttl,
            )
        if isinstance(message, AuthenticateResponse):
            record = self.store.get_establishment(message.src, message.est_id)
            return ServerCompletion(
                server_id=SERVER_ID,
                requester=message.src,
                pending=EstablishmentPending.from_record(record) if record is not None else None,
                lookups=self.lookups(),
                now=now,
            )
        return None


# -- the parties' I/O layers -----------------------------------------------------------------


@dataclass
class PNEMachine:
    """One establishment machine of a PNE and the transaction it belongs to."""

    machine: OriginatingPNE | InvitedPNE
    pn_id: str
    #: The SETUP Request's txid (originator) or the PNInvite's (invited).
    txid: bytes
    #: The AUTHENTICATE Request it answered.
    answered: PNEAuthenticateRequest | None = None
    abandoned: bool = False

    @property
    def live(self) -> bool:
        return not self.abandoned and not self.machine.terminal


@dataclass
class GatewayRun:
    """One establishment at the PN GW."""

    machine: GatewayEstablishment
    originator: str
    setup_txid: bytes
    #: The last PAN message sent to each PNE and how often it was sent.
    last_pan: dict[str, tuple[Message, int]] = field(default_factory=dict)
    #: The open HTTP request and how often it was sent.
    outstanding: tuple[Message, int] | None = None
    #: The SETUP Response sent to the originator (answers its retransmissions).
    final: PNSetupResponse | None = None
    dead: bool = False


@dataclass
class RoundLog:
    """What one round produced (for the checks)."""

    joined: dict[str, PNEJoined] = field(default_factory=dict)
    #: (pne_id, est_id) of every OK AUTHENTICATE Response a PNE sent.
    proofs: set[tuple[str, bytes]] = field(default_factory=set)
    gateway_runs: list[GatewayRun] = field(default_factory=list)


class Simulation:
    """One schedule: a random world, chaotic rounds, then one clean round."""

    def __init__(
        self,
        seed: int,
        *,
        rounds: int | None = None,
        faults: Faults | None = None,
        store_dir: Path | None = None,
        concurrency: float = 0.3,
        exclusive: bool | None = None,
    ) -> None:
        self.seed = seed
        #: Chance that a second establishment overlaps a chaotic round's.
        self.concurrency = concurrency
        #: Whether a PNE runs one establishment machine at a time (a new invitation
        #: supersedes the old machine) or one per invitation; drawn aside from the
        #: schedule's stream so that seeds keep their schedules.
        #: The server's pending-establishment lifetime: the default, or short enough that
        #: a slow establishment outlives its pending state (UNKNOWN_ESTABLISHMENT).
        self.ttl = random.Random(seed ^ 0x7711).choice([PENDING_TTL, PENDING_TTL, 8, 20])
        self.exclusive = (
            exclusive if exclusive is not None else random.Random(seed ^ 0x5EED).random() < 0.5
        )
        self.rnd = random.Random(seed)
        self.world = World(self.rnd.getrandbits(32))
        self.faults = faults or Faults()
        self.rounds = rounds if rounds is not None else self.rnd.randint(1, 3)
        self.time = 0.0
        self._seq = 0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._store_dir = store_dir
        self.trace: list[str] = []
        # The world: 2..6 PNEs of alice of both kinds, another user's PNE.
        n = self.rnd.randint(2, 6)
        self.pne_ids: list[str] = []
        for i in range(n):
            pne_id = f"pne-{i}"
            if self.rnd.random() < 0.5:
                self.world.add_tk_pne(pne_id, chain_length=self.rnd.randint(1, 4))
            else:
                self.world.add_rand_hash_pne(pne_id)
            self.pne_ids.append(pne_id)
        self.world.add_rand_hash_pne(OTHER_USER_PNE, owner="bob")
        self.wants_local = {p for p in self.pne_ids if self.rnd.random() < 0.3}
        self.store = self._open_store(first=True)
        self._load_store()
        self.server = SimServer(self.store, self.world.rng, ttl=self.ttl)
        self.server_up = True
        self.gw_up = True
        self.pne_up = dict.fromkeys(self.world.pnes, True)
        self.pne_machines: dict[str, list[PNEMachine]] = {p: [] for p in self.world.pnes}
        self.gw_runs: list[GatewayRun] = []
        self.epoch = {"gw": 0, "server": 0, **dict.fromkeys(self.world.pnes, 0)}
        # The facts the checks compare against.
        #: (pne_id, est_id) -> (status, SK) of every committed server result.
        self.committed: dict[tuple[str, bytes], tuple[ErrorCode, bytes | None]] = {}
        #: (pne_id, est_id) -> the LocalEUKey the server committed.
        self.server_local: dict[tuple[str, bytes], bytes] = {}
        self.holders: dict[bytes, tuple[str, frozenset[str]]] = {}
        #: The keys a sealed field may be sealed under: EUKeys, and TK_t by step t.
        self.eukeys: list[bytes] = []
        self.tks: dict[int, list[bytes]] = {}
        self._track_credentials()
        self._checked: set[bytes] = set()
        self.seen_pan: list[Message] = []
        #: Every request the PN GW sent the server, retries included.
        self.upstream_log: list[Message] = []
        self.log = RoundLog()

    # -- set-up ---------------------------------------------------------------------------

    def _open_store(self, *, first: bool = False) -> ServerStore:
        if self._store_dir is None:
            if first:
                return MemoryStore()
            return self.store  # the memory store outlives the server process
        return SQLStore.open(self._store_dir / "cpns.db", master_key=MasterKey(_MASTER_KEY))

    def _load_store(self) -> None:
        world = self.world

        def load(tx: WriteTx) -> None:
            for user in (OWNER, "bob"):
                tx.add_user(UserRecord(user_id=user, password_key=bytes(32), created_at=0))
            for entity in world.entities.values():
                tx.put_entity(entity)
            tx.put_tks(
                [
                    TKRecord(entity_id=pne_id, tk=tk, tk_step=step)
                    for pne_id, (tk, step) in world.server_tk.items()
                ]
            )

        self.store.write(load)

    def _track_credentials(self) -> None:
        world = self.world
        self._hold(world.gw_eukey, "gw EUKey", {GW_ID, SERVER_ID})
        self.eukeys.append(world.gw_eukey)
        for pne_id, entity in world.entities.items():
            if entity.kind.name != "PNE":
                continue
            self.eukeys.extend(entity.eukeys)
            if entity.assigned_via is None:
                self._hold(entity.eukeys[0], f"{pne_id} EUKey", {pne_id, SERVER_ID})
                continue
            who = {pne_id, GW_ID, SERVER_ID}
            for i, key in enumerate(entity.eukeys, 1):
                self._hold(key, f"{pne_id} EUKey_{i}", who)
            tk = world.server_tk[pne_id][0]
            for step in range(64):  # every TK step a schedule can reach
                self._hold(tk, f"{pne_id} TK_{step}", who)
                self.tks.setdefault(step, []).append(tk)
                tk = tk_auth.ratchet(tk)

    def _hold(self, key: bytes, name: str, who: set[str]) -> None:
        self.holders.setdefault(key, (name, frozenset(who)))

    # -- the scheduler --------------------------------------------------------------------

    def at(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` ``delay`` virtual seconds from now."""
        self._seq += 1
        heapq.heappush(self._queue, (self.time + delay, self._seq, fn))

    def now(self) -> int:
        """The server's clock."""
        return self.world.now + int(self.time)

    def fail(self, what: str) -> SimulationFailure:
        """A failure naming the seed, the replay command and the end of the trace."""
        tail = "\n  ".join(self.trace[-25:])
        return SimulationFailure(
            f"seed {self.seed}: {what}\n  replay: {replay_hint(self.seed)}\n  last steps:\n  {tail}"
        )

    def _note(self, text: str) -> None:
        self.trace.append(f"{self.time:8.2f} {text}")

    def _drain(self) -> None:
        for _ in range(STEP_BUDGET):
            if not self._queue:
                return
            self.time, _, fn = heapq.heappop(self._queue)
            fn()
        raise self.fail(f"the round did not end within {STEP_BUDGET} steps (livelock)")

    def _chance(self, p: float) -> bool:
        return p > 0 and self.rnd.random() < p

    def _delay(self) -> float:
        return 0.01 + self.rnd.uniform(0, self.faults.delay)

    # -- crashes ----------------------------------------------------------------------------

    def _crash(self, party: str) -> None:
        """``party`` goes down now and restarts from its stored facts a little later."""
        self._note(f"CRASH {party}")
        self.epoch[party] += 1
        if party == "server":
            self.server_up = False
        elif party == "gw":
            self.gw_up = False
            for run in self.gw_runs:
                run.dead = True
        else:
            self.pne_up[party] = False
            self.pne_machines[party] = []
        self.at(self.rnd.uniform(1.0, 20.0), lambda: self._restart(party))

    def _restart(self, party: str) -> None:
        self._note(f"RESTART {party}")
        if party == "server":
            if self._store_dir is not None:
                self.store.close()
                self.store = self._open_store()
            self.server = SimServer(self.store, self.world.rng, ttl=self.ttl)
            self.server_up = True
        elif party == "gw":
            self.gw_up = True
        else:
            self.pne_up[party] = True

    def _maybe_crash(self, party: str) -> bool:
        if self._chance(self.faults.crash):
            self._crash(party)
            return True
        return False

    # -- the PAN: PNE <-> PN GW, with the adversary -----------------------------------------

    def _pan_send(self, message: Message, *, honest: bool = True) -> None:
        if honest:
            self._check_message(message)
            self.seen_pan.append(message)
        self._note(f"send {type(message).__name__} {message.src}->{message.dst}")
        if self._chance(self.faults.drop):
            self._note("  dropped")
            return
        copies = 2 if self._chance(self.faults.duplicate) else 1
        for _ in range(copies):
            delivered = message
            if honest and self._chance(self.faults.adversary):
                delivered = self._adversary(message)
            self.at(self._delay(), lambda m=delivered: self._pan_deliver(m))

    def _pan_deliver(self, message: Message) -> None:
        if message.dst == GW_ID:
            self._gw_receive(message)
        elif message.dst in self.world.pnes:
            self._pne_receive(message.dst, message)

    def _adversary(self, message: Message) -> Message:
        """Tamper with ``message``, or inject a forgery or a replay beside it."""
        action = self.rnd.choice(["tamper", "forge", "replay"])
        if action == "tamper":
            names = [
                n
                for n in (
                    "hash_server",
                    "confirm",
                    "an",
                    "rand_server",
                    "est_id",
                    "hash_pne",
                    "rand_pne",
                    "sealed_local_eukey",
                    "sealed_next_eukey",
                    "sealed_eukey",
                )
                if isinstance(getattr(message, n, None), bytes)
            ]
            if names:
                name = self.rnd.choice(names)
                value = bytearray(getattr(message, name))
                value[self.rnd.randrange(len(value))] ^= 1 << self.rnd.randrange(8)
                self._note(f"  ADVERSARY tampers {name}")
                return dataclasses.replace(message, **{name: bytes(value)})
            return message
        if action == "forge":
            forged = self._forgery(message.dst if message.dst != GW_ID else message.src)
            if forged is not None:
                self._note(f"  ADVERSARY forges {type(forged).__name__} to {forged.dst}")
                self.at(self._delay(), lambda: self._pan_deliver(forged))
            return message
        old = self.rnd.choice(self.seen_pan)
        self._note(f"  ADVERSARY replays {type(old).__name__} to {old.dst}")
        self.at(self._delay(), lambda: self._pan_deliver(old))
        return message

    def _forgery(self, pne_id: str) -> Message | None:
        """A well-formed final message for the PNE's latest transaction the adversary saw,
        with a random hash_server and key confirmation."""
        est_ids = [m.est_id for m in self.seen_pan if isinstance(m, PNEAuthenticateRequest)] or [
            self.rnd.randbytes(16)
        ]
        for m in reversed(self.seen_pan):
            if isinstance(m, PNSetupRequest) and m.src == pne_id:
                return PNSetupResponse(
                    txid=m.txid,
                    src=GW_ID,
                    dst=pne_id,
                    pn_id=m.pn_id,
                    status=ErrorCode.OK,
                    est_id=est_ids[-1],
                    hash_server=self.rnd.randbytes(32),
                    confirm=self.rnd.randbytes(32),
                    members=(),
                )
            if isinstance(m, PNInvite) and m.dst == pne_id:
                return PNEstablishmentNotify(
                    txid=m.txid,
                    src=GW_ID,
                    dst=pne_id,
                    pn_id=m.pn_id,
                    status=ErrorCode.OK,
                    est_id=est_ids[-1],
                    hash_server=self.rnd.randbytes(32),
                    confirm=self.rnd.randbytes(32),
                )
        return None

    # -- PNE I/O layer --------------------------------------------------------------------

    def _pne_new_machine(self, pne_id: str, *, invited: bool) -> OriginatingPNE | InvitedPNE:
        if self.exclusive:
            for old in self.pne_machines[pne_id]:
                old.abandoned = True  # one establishment machine per PNE
        holder = self.world.pnes[pne_id]
        common: dict[str, Any] = {
            "pne_id": pne_id,
            "gw_id": GW_ID,
            "server_id": SERVER_ID,
            "eukey": holder.eukey,
            "tk_state": holder.tk_state,
            "rng": self.world.rng,
            # The machine reads the stored TK state when it answers or confirms.
            "tk_lookup": lambda: holder.tk_state,
        }
        if invited:
            return InvitedPNE(local_eukey=pne_id in self.wants_local, **common)
        return OriginatingPNE(**common)

    def start(self, originator: str, invite: list[str], pn_id: str = PN_ID) -> None:
        """The originating PNE starts an establishment (its SETUP Request)."""
        if not self.pne_up[originator]:
            return
        machine = self._pne_new_machine(originator, invited=False)
        assert isinstance(machine, OriginatingPNE)
        machine.start(pn_id=pn_id, invite=tuple(invite), local_eukey=originator in self.wants_local)
        assert machine.request is not None
        entry = PNEMachine(machine=machine, pn_id=pn_id, txid=machine.request.txid)
        self.pne_machines[originator].append(entry)
        self._pne_outbox(originator, entry)
        self._originator_timer(originator, entry, 1)

    def _originator_timer(self, pne_id: str, entry: PNEMachine, tries: int) -> None:
        epoch = self.epoch[pne_id]

        def fire() -> None:
            if self.epoch[pne_id] != epoch or not entry.live:
                return
            if tries >= PNE_TRIES:
                self._note(f"{pne_id} abandons its establishment")
                entry.abandoned = True
                return
            assert isinstance(entry.machine, OriginatingPNE)
            assert entry.machine.request is not None
            self._pan_send(entry.machine.request)
            self._originator_timer(pne_id, entry, tries + 1)

        self.at(PNE_RTO, fire)

    def _pne_receive(self, pne_id: str, message: Message) -> None:
        if not self.pne_up[pne_id]:
            return
        entries = self.pne_machines[pne_id]
        target: PNEMachine | None = None
        if isinstance(message, PNInvite):
            target = next((e for e in entries if e.txid == message.txid), None)
            if target is None:
                machine = self._pne_new_machine(pne_id, invited=True)
                target = PNEMachine(machine=machine, pn_id=message.pn_id or "", txid=message.txid)
                entries.append(target)
                epoch = self.epoch[pne_id]

                def abandon(e: PNEMachine = target) -> None:
                    if self.epoch[pne_id] == epoch and e.live:
                        self._note(f"{pne_id} abandons an establishment")
                        e.abandoned = True

                self.at(PNE_ABANDON, abandon)
        elif isinstance(message, PNSetupResponse | PNEstablishmentNotify):
            target = next((e for e in entries if e.txid == message.txid), None)
        elif isinstance(message, PNEAuthenticateRequest):
            target = next((e for e in entries if e.answered == message), None)
            if target is None:
                target = next(
                    (
                        e
                        for e in reversed(entries)
                        if e.live
                        and e.pn_id == message.pn_id
                        and e.machine.state is PNEState.EXPECT_AUTHENTICATE_REQUEST
                    ),
                    None,
                )
        if target is None or not target.live:
            return
        events = target.machine.receive(message)
        self._note(f"{pne_id} <- {type(message).__name__}: {_names(events)}")
        holder = self.world.pnes[pne_id]
        for event in events:
            self._pne_event(pne_id, holder, event)
        if isinstance(message, PNEAuthenticateRequest) and target.answered is None:
            if target.machine.state is PNEState.EXPECT_RESULT:
                target.answered = message
        if self._maybe_crash(pne_id):
            return
        self._pne_outbox(pne_id, target)

    def _pne_event(self, pne_id: str, holder: PNEHolder, event: Event) -> None:
        if isinstance(event, PNETKUpdated):
            holder.tk_state = event.state
        elif isinstance(event, LocalEUKeyStored):
            expected = self.server_local.get((pne_id, event.est_id))
            if expected != event.local_eukey:
                raise self.fail(f"{pne_id} stored a LocalEUKey the server did not give it")
            holder.local_eukey = event.local_eukey
        elif isinstance(event, PNEJoined):
            result = self.committed.get((pne_id, event.est_id))
            if result is None or result[0] is not ErrorCode.OK or result[1] != event.sk:
                raise self.fail(f"{pne_id} accepted a server that did not authenticate it")
            self.log.joined[pne_id] = event

    def _pne_outbox(self, pne_id: str, entry: PNEMachine) -> None:
        for message in entry.machine.messages_to_send():
            if isinstance(message, PNEAuthenticateResponse) and message.status is ErrorCode.OK:
                self.log.proofs.add((pne_id, message.est_id))
            self._pan_send(message)

    # -- PN GW I/O layer --------------------------------------------------------------------

    def _gw_receive(self, message: Message) -> None:
        if not self.gw_up:
            return
        live = [r for r in self.gw_runs if not r.dead]
        if isinstance(message, PNSetupRequest):
            run = next(
                (r for r in live if r.originator == message.src and r.setup_txid == message.txid),
                None,
            )
            if run is None:
                machine = GatewayEstablishment(
                    gw_id=GW_ID,
                    gw_eukey=self.world.gw_eukey,
                    server_id=SERVER_ID,
                    rng=self.world.rng,
                    tk_lookup=self.world.gw_tk.get,
                )
                run = GatewayRun(machine=machine, originator=message.src, setup_txid=message.txid)
                self.gw_runs.append(run)
                self.log.gateway_runs.append(run)
            elif run.machine.terminal:
                if run.final is not None:
                    self._pan_send(run.final)  # a lost SETUP Response, answered again
                return
            self._gw_feed(run, message)
            return
        for run in live:
            if not run.machine.terminal:
                self._gw_feed(run, message)

    def _gw_feed(self, run: GatewayRun, message: Message) -> None:
        events = run.machine.receive(message)
        self._note(f"gw <- {type(message).__name__}: {_names(events)}")
        self._gw_after(run, events)

    def _gw_after(self, run: GatewayRun, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, GatewayTKUpdated):
                held = self.world.gw_tk[event.pne_id]
                self.world.gw_tk[event.pne_id] = GatewayTKHolding(
                    state=event.state, eukeys=held.eukeys
                )
            elif isinstance(event, ReassignmentRequested):
                if event.reason is not ErrorCode.CHAIN_EXHAUSTED:
                    # No PNE of the simulation is restored from a backup: nothing but an
                    # exhausted chain may ask for a 003 re-assignment.
                    raise self.fail(f"re-assignment of {event.pne_id} asked: {event.reason!s}")
            elif isinstance(event, LocalEUKeyStored):
                if self.server_local.get((event.pne_id, event.est_id)) != event.local_eukey:
                    raise self.fail("the PN GW stored a LocalEUKey the server did not give")
                self.world.gw_local[(event.pne_id, event.pn_id)] = event.local_eukey
        if self._maybe_crash("gw"):
            return
        for message in run.machine.messages_to_send():
            if message.dst == SERVER_ID:
                self._upstream(run, message, 1)
            else:
                if isinstance(message, PNSetupResponse):
                    run.final = message
                run.last_pan[message.dst] = (message, 1)
                self._pan_send(message)
                self._pan_timer(run, message.dst, message)

    def _pan_timer(self, run: GatewayRun, pne_id: str, message: Message) -> None:
        epoch = self.epoch["gw"]

        def fire() -> None:
            if self.epoch["gw"] != epoch or run.dead or run.machine.terminal:
                return
            sent, tries = run.last_pan.get(pne_id, (None, 0))
            if sent is not message or pne_id not in run.machine.awaiting():
                return
            if tries < PAN_TRIES:
                run.last_pan[pne_id] = (message, tries + 1)
                self._pan_send(message)
                self._pan_timer(run, pne_id, message)
                return
            self._note(f"gw: {pne_id} timed out")
            self._gw_after(run, run.machine.timeout(pne_id))

        self.at(PAN_RTO, fire)

    def _upstream(self, run: GatewayRun, request: Message, tries: int) -> None:
        """One HTTP exchange with the server (lossy, duplicated, delayed both ways)."""
        run.outstanding = (request, tries)
        self.upstream_log.append(request)
        self._check_message(request)
        epoch = self.epoch["gw"]
        self._note(f"http {type(request).__name__} try {tries}")
        if not self._chance(self.faults.drop):
            for _ in range(2 if self._chance(self.faults.duplicate) else 1):
                self.at(self._delay(), lambda: self._server_receive(run, request, epoch))

        def fire() -> None:
            if self.epoch["gw"] != epoch or run.dead or run.machine.terminal:
                return
            if run.outstanding is None or run.outstanding[0] is not request:
                return
            if tries < UP_TRIES:
                self._upstream(run, request, tries + 1)
                return
            run.outstanding = None
            self._note("gw: server unreachable")
            self._gw_after(
                run, run.machine.fail(ErrorCode.UPSTREAM_UNAVAILABLE, "no answer from the server")
            )

        self.at(UP_RTO, fire)

    def _server_receive(self, run: GatewayRun, request: Message, epoch: int) -> None:
        if not self.server_up:
            return
        crash = None
        if self._chance(self.faults.crash):
            crash = self.rnd.choice(["before-commit", "after-commit"])
        reply, events = self.server.handle(request, self.now(), crash=crash)
        self._server_committed(events)
        self._note(f"server <- {type(request).__name__}: {_names(events)}")
        if crash is not None:
            self._crash("server")
            return
        assert reply is not None
        self._check_message(reply)
        if self._chance(self.faults.drop):
            return
        for _ in range(2 if self._chance(self.faults.duplicate) else 1):
            self.at(self._delay(), lambda: self._gw_http_reply(run, reply, epoch))

    def _gw_http_reply(self, run: GatewayRun, reply: Message, epoch: int) -> None:
        if self.epoch["gw"] != epoch or run.dead or run.machine.terminal:
            return  # the connection died with the PN GW
        if run.outstanding is None or run.outstanding[0].txid != reply.txid:
            return  # no open request for it: HTTP discards it
        run.outstanding = None
        self._gw_feed(run, reply)

    def _server_committed(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, EstablishmentPending):
                for entry in event.entries:
                    if entry.local_eukey is not None:
                        self.server_local[(entry.pne_id, event.est_id)] = entry.local_eukey
                        self._hold(
                            entry.local_eukey,
                            f"LocalEUKey {entry.pne_id}",
                            {entry.pne_id, GW_ID, SERVER_ID},
                        )
            elif isinstance(event, PNEstablished):
                # The inventory now holds exactly this establishment's verdicts.
                pn = self.store.get_pn(event.pn_id)
                stored = {m.pne_id: m.status for m in pn.members} if pn is not None else {}
                for m in event.members():
                    if stored.get(m.pne_id) != m.status:
                        raise self.fail(f"inventory of {event.pn_id}: {m.pne_id} not {m.status}")
                for r in event.results:
                    self.committed[(r.pne_id, event.est_id)] = (r.status, r.sk)
                    if r.joined and (r.pne_id, event.est_id) not in self.log.proofs:
                        raise self.fail(f"server made {r.pne_id} a member without its proof")
                    if r.joined and r.pne_id in (OTHER_USER_PNE, UNKNOWN_PNE):
                        raise self.fail(f"{r.pne_id} became a member")
                    if r.sk is not None:
                        who = {r.pne_id, SERVER_ID}
                        if r.flow is AuthFlow.TK:
                            who.add(GW_ID)  # it holds TK and chain: docs say so
                        self._hold(r.sk, f"SK {r.pne_id}", who)
        self._check_state()

    # -- the checks -----------------------------------------------------------------------

    def _check_message(self, message: Message) -> None:
        """No key in the bytes of an honest message; every sealed field opens only under
        keys whose holders all hold what it seals."""
        body = encode(message)
        if body in self._checked:
            return
        self._checked.add(body)
        for key, (name, _) in self.holders.items():
            if key in body:
                raise self.fail(f"{name} in the clear in {type(message).__name__}")
        for step, opener in _sealed_fields(message):
            candidates = self.eukeys if step is None else self.tks.get(step, [])
            for key in candidates:
                try:
                    plain = opener(key)
                except AuthenticationFailed:
                    continue
                name, who = self.holders[key]
                inner = self.holders.get(plain)
                if inner is None:
                    raise self.fail(f"{type(message).__name__} seals an unknown value")
                if not who <= inner[1]:
                    raise self.fail(
                        f"{type(message).__name__} seals {inner[0]} under {name}: "
                        f"{sorted(who - inner[1])} would learn it"
                    )

    def _check_state(self) -> None:
        """The TK state of server, PN GW and PNE stays within the resync rule's bounds."""
        for pne_id, holder in self.world.pnes.items():
            state = holder.tk_state
            if state is None:
                continue
            record = self.store.get_tk(pne_id)
            entity = self.store.get_entity(pne_id)
            assert record is not None
            assert entity is not None
            s, i = record.tk_step, entity.key_index
            c, j = state.tk_step, state.key_index
            g = self.world.gw_tk[pne_id].state.tk_step
            pending = state.pending
            ok = c <= s <= c + 1 and g <= s and j <= i <= j + 1
            if i == j + 1:
                ok = ok and pending is not None and pending.eukey == entity.eukeys[i - 1]
            if state.eukey != entity.eukeys[j - 1]:
                ok = False
            if not ok:
                raise self.fail(
                    f"{pne_id}: server (s={s}, i={i}), PN GW g={g}, PNE (c={c}, j={j}, "
                    f"pending={pending.key_index if pending else None}) out of the rule"
                )

    # -- rounds ---------------------------------------------------------------------------

    def chaotic_round(self) -> RoundLog:
        """One establishment under the faults; returns its log."""
        self.log = RoundLog()
        originators = self.rnd.sample(self.pne_ids, 2)
        # Sometimes a second establishment (another PN) overlaps the first one.
        concurrent = self._chance(self.concurrency)
        for originator, pn_id, when in zip(
            originators[: 2 if concurrent else 1],
            (PN_ID, SECOND_PN_ID),
            (0.0, self.rnd.uniform(0.0, 15.0)),
            strict=False,
        ):
            others = [p for p in self.pne_ids if p != originator]
            invite = self.rnd.sample(others, self.rnd.randint(0, len(others)))
            if self._chance(0.3):
                invite.append(OTHER_USER_PNE)
            if self._chance(0.2):
                invite.append(UNKNOWN_PNE)
            self.rnd.shuffle(invite)
            self._note(f"ROUND {originator} invites {invite} to {pn_id}")
            self.at(when, lambda o=originator, i=invite, p=pn_id: self.start(o, i, p))
        self._drain()
        self._check_round_ended()
        return self.log

    def clean_round(self) -> RoundLog:
        """One establishment with no fault: every PNE of alice must join (N1)."""
        self.faults, chaos = CLEAN, self.faults
        try:
            self.log = RoundLog()
            originator, *invite = self.pne_ids
            self._note(f"CLEAN ROUND {originator} invites {invite}")
            self.start(originator, invite)
            self._drain()
            self._check_round_ended()
            missing = [p for p in self.pne_ids if p not in self.log.joined]
            if missing:
                raise self.fail(f"after the chaos, {missing} could not join")
            pn = self.store.get_pn(PN_ID)
            assert pn is not None
            members = {m.pne_id for m in pn.joined}
            if members != set(self.pne_ids):
                raise self.fail(f"inventory members {sorted(members)} != {self.pne_ids}")
            return self.log
        finally:
            self.faults = chaos

    def _check_round_ended(self) -> None:
        for run in self.log.gateway_runs:
            if not run.dead and not run.machine.terminal:
                raise self.fail("a PN GW establishment did not end")
        for pne_id, entries in self.pne_machines.items():
            for entry in entries:
                if entry.live:
                    raise self.fail(f"an establishment machine of {pne_id} did not end")
        self._check_state()

    def run(self) -> None:
        """The whole schedule; raises :class:`SimulationFailure` on a broken property."""
        try:
            for _ in range(self.rounds):
                self.chaotic_round()
            # Parties still down come back before the clean round.
            self.server_up = self.gw_up = True
            self.pne_up = dict.fromkeys(self.pne_up, True)
            self.clean_round()
        except SimulationFailure:
            raise
        except Exception as exc:
            raise self.fail(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if self._store_dir is not None:
                self.store.close()


def _names(events: list[Event]) -> str:
    return ",".join(
        type(e).__name__ + (f"({e.code!s})" if isinstance(e, ProcedureFailed) else "")
        for e in events
    )


type _Opener = Callable[[bytes], bytes]


def _sealed_fields(message: Message) -> Iterator[tuple[int | None, _Opener]]:
    """Every sealed field of ``message``: the TK step it is sealed at (None: under an
    EUKey) and how to open it with a candidate key (the context comes from the message's
    own fields)."""
    est_id = getattr(message, "est_id", None)
    pn_id = message.pn_id or ""

    def local(blob: bytes, pne_id: str, holder: str, gw_id: str) -> _Opener:
        return lambda key: open_local_eukey(
            key,
            blob,
            server_id=SERVER_ID,
            gw_id=gw_id,
            pne_id=pne_id,
            pn_id=pn_id,
            est_id=est_id or b"",
            holder_id=holder,
        )

    def run(pne_id: str) -> tk_auth.TKRun:
        return tk_auth.TKRun(
            pn_id=pn_id,
            gw_id=GW_ID,
            server_id=SERVER_ID,
            pne_id=pne_id,
            est_id=est_id or bytes(16),
            rand_pne=bytes(32),
            rand_server=bytes(32),
        )

    def current(blob: bytes, pne_id: str, step: int, index: int) -> _Opener:
        return lambda key: tk_auth.open_current_eukey(key, blob, run(pne_id), step, index)

    if isinstance(message, AuthenticateRequest):
        for ch in message.entries:
            yield from _challenge_fields(ch, local, message.dst)
    elif isinstance(message, PNEAuthenticateRequest):
        if message.sealed_local_eukey is not None:
            yield None, local(message.sealed_local_eukey, message.dst, message.dst, message.src)
        if message.sealed_next_eukey is not None and message.tk_step is not None:
            blob, step = message.sealed_next_eukey, message.tk_step
            index = (message.key_index or 0) + 1
            yield (
                step,
                (lambda key: tk_auth.open_next_eukey(key, blob, run(message.dst), step, index)),
            )
    elif isinstance(message, PNEAuthenticateResponse):
        if message.sealed_eukey is not None and message.tk_step is not None:
            yield (
                message.tk_step,
                current(message.sealed_eukey, message.src, message.tk_step, message.key_index or 0),
            )
    elif isinstance(message, AuthenticateResponse):
        for proof in message.entries:
            yield from _proof_fields(proof, current)


def _challenge_fields(
    ch: AuthChallenge, local: Callable[[bytes, str, str, str], _Opener], gw_id: str
) -> Iterator[tuple[int | None, _Opener]]:
    if ch.sealed_local_pne is not None:
        yield None, local(ch.sealed_local_pne, ch.pne_id, ch.pne_id, gw_id)
    if ch.sealed_local_gw is not None:
        yield None, local(ch.sealed_local_gw, ch.pne_id, gw_id, gw_id)


def _proof_fields(
    proof: AuthProof, current: Callable[[bytes, str, int, int], _Opener]
) -> Iterator[tuple[int | None, _Opener]]:
    if proof.sealed_eukey is not None and proof.tk_step is not None:
        yield (
            proof.tk_step,
            current(proof.sealed_eukey, proof.pne_id, proof.tk_step, proof.key_index or 0),
        )


def iter_seeds(default: int, start: int = 0) -> list[int]:
    """The seeds a test runs: ``CPNS_SIM_SEED`` (one), else ``CPNS_SIM_SEEDS`` (a count)
    or ``default`` seeds from ``start``."""
    import os

    one = os.environ.get("CPNS_SIM_SEED")
    if one:
        return [int(one)]
    count = int(os.environ.get("CPNS_SIM_SEEDS", default))
    return list(range(start, start + count))
