"""003 re-assignment through the real machines, for the three-party TK model of tk_sim.

:func:`reassign_by_003` replaces :meth:`tests.tk_sim.World.reassign` (a stand-in written
with the pure functions) by the real procedure: the server machine reads a directory that
holds the server's ratcheted TK record and the PNE's current chain, the PN GW machine asks
and relays, the PNE machine opens the Notification from its own TK-flow state. Every
message crosses the real codec. The facts the machines report are then applied to the
model the way the I/O shells persist them (server: new chain, index 1, TK step unchanged;
PN GW: ``GatewayTKState(tk, tk_step)`` and the set; PNE: the installed ``tk_state``).
Used by tests/unit/protocol/test_key_assignment_reassign.py and
tests/property/test_reassignment_property.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cpns.protocol._machine import Event, ProcedureFailed
from cpns.protocol.key_assignment import (
    AssignmentPolicy,
    EUKeyAssignmentDevice,
    EUKeyAssignmentGateway,
    EUKeyAssignmentServer,
    EUKeyChainAssigned,
    EUKeyDelivered,
    EUKeyInstalled,
    EUKeySetReceived,
    claim_code,
    claim_key,
)
from cpns.protocol.tk_auth import GatewayTKState, PNETKState
from cpns.records import TKRecord
from cpns.types import EntityKind
from tests.helpers import (
    FIXED_NOW,
    GATEWAY_KEYS,
    PASSWORDS,
    WRONG_CLAIM_CODE,
    Exchange,
    FixedRandom,
    standard_directory,
)
from tests.tk_sim import IDS, ServerSide, World

GW = IDS["gw_id"]
PNE = IDS["pne_id"]
SERVER = IDS["server_id"]
USER = "alice"


@dataclass
class Reassigned:
    """What one 003 re-assignment produced, party by party."""

    events: list[tuple[str, Event]]

    def of[E: Event](self, kind: type[E]) -> E | None:
        """The first event of ``kind``, or None."""
        return next((e for _, e in self.events if isinstance(e, kind)), None)

    @property
    def failure(self) -> ProcedureFailed | None:
        """The first failure, or None."""
        return self.of(ProcedureFailed)


def reassign_by_003(
    world: World,
    *,
    factory_tk: bytes,
    password_key: Callable[[str, str], bytes],
    epoch: int = 1,
    pne_state: PNETKState | None = None,
    seed: int = 7,
) -> Reassigned:
    """Run 003 for the model's PNE against the server's current state and apply it.

    ``epoch`` is the PNE's assignment count so far; ``pne_state`` the PNE's TK-flow state
    the device machine starts from (by default the model's). The label's claim code is
    typed only while the server's TK record is at step 0 (afterwards the server cannot
    check it, deviations D-003-13). Nothing is applied if any party failed.
    """
    directory = standard_directory(password_key)
    s = world.server
    directory.tks[PNE] = TKRecord(entity_id=PNE, tk=s.tk, tk_step=s.tk_step, source="test")
    directory.add_entity(
        PNE,
        EntityKind.PNE,
        USER,
        eukeys=s.eukeys,
        key_index=s.key_index,
        assigned_via=GW,
        assigned_at=FIXED_NOW,
        epoch=epoch,
    )
    code = claim_code(factory_tk, PNE) if s.tk_step == 0 else WRONG_CLAIM_CODE
    gateway = EUKeyAssignmentGateway(
        gateway_id=GW, gateway_eukey=GATEWAY_KEYS[GW], server_id=SERVER, rng=FixedRandom(seed)
    )
    gateway.start(
        pne_id=PNE,
        user_id=USER,
        password_key=password_key(USER, PASSWORDS[USER]),
        claim_key=claim_key(code),
        now=FIXED_NOW,
    )
    server = EUKeyAssignmentServer(
        policy=AssignmentPolicy(server_id=SERVER, chain_length=world.chain_len),
        lookups=directory.lookups(),
        requester=GW,
        rng=FixedRandom(seed + 1),
        now=FIXED_NOW,
    )
    device = EUKeyAssignmentDevice(
        entity_id=PNE,
        tk=factory_tk,
        rng=FixedRandom(seed + 2),
        tk_state=world.pne if pne_state is None else pne_state,
    )
    result = Reassigned(Exchange({SERVER: server, GW: gateway, PNE: device}).run())
    chain = result.of(EUKeyChainAssigned)
    key_set = result.of(EUKeySetReceived)
    installed = result.of(EUKeyInstalled)
    if result.failure is not None or result.of(EUKeyDelivered) is None:
        return result
    assert chain is not None
    assert key_set is not None
    assert installed is not None
    assert installed.tk_state is not None
    # Applied as the I/O shells persist the facts (server: _tk_persist keeps the TK record).
    world.server = ServerSide(tk=s.tk, tk_step=s.tk_step, key_index=1, eukeys=chain.eukeys)
    world.gateway = GatewayTKState(tk=key_set.tk, tk_step=key_set.tk_step)
    world.gateway_eukeys = key_set.eukeys
    world.pne = installed.tk_state
    world.reassign_due = False
    return result
