"""PN Establishment, server roles: a PN ID belongs to one CPNS User (issue 6 item 6, our
rule: docs/procedures/pn-establishment.md, "Server"). The roles read the PN inventory's
owner through ``EstablishmentLookups.get_pn_owner``; the world of tests/pn_world.py runs
them with that lookup added."""

from __future__ import annotations

import dataclasses

from tests.pn_world import OWNER, PN_ID, World

from cpns.errors import ErrorCode
from cpns.messages.model import AuthenticateResponse, Message
from cpns.protocol.pn_establishment import EstablishmentLookups


class _OwnedWorld(World):
    """The world with a PN inventory's owners the server roles read."""

    def __init__(self) -> None:
        super().__init__(seed=5)
        self.pn_owners: dict[str, str] = {}
        self.add_rand_hash_pne("pne-r1")
        self.add_tk_pne("pne-t1")

    def lookups(self) -> EstablishmentLookups:
        return dataclasses.replace(super().lookups(), get_pn_owner=self.pn_owners.get)


def test_the_owner_of_the_pn_id_may_establish_it_again() -> None:
    """The PN's own user (the PN GW's owner) establishes it again: everyone joins."""
    world = _OwnedWorld()
    world.pn_owners[PN_ID] = OWNER
    outcome = world.establish("pne-r1", ("pne-t1",))
    assert outcome.server_status() == {"pne-r1": ErrorCode.OK, "pne-t1": ErrorCode.OK}


def test_another_users_pn_id_is_policy_denied_at_the_setup_request() -> None:
    """A PN ID in the inventory for another user: the SETUP Request is refused as a whole
    with POLICY_DENIED; nothing is pending, nobody joins."""
    world = _OwnedWorld()
    world.pn_owners[PN_ID] = "bob"
    outcome = world.establish("pne-r1", ("pne-t1",))
    assert not world.pending
    assert world.inventory == {}
    finished = outcome.finished()
    assert finished is None or all(m.status is not ErrorCode.OK for m in finished.members)
    assert outcome.joined("pne-r1") is None
    refusal = outcome.pne_failure("pne-r1")
    assert refusal is not None
    assert refusal.code is ErrorCode.POLICY_DENIED


def test_a_pn_id_taken_by_another_user_between_the_halves_is_policy_denied() -> None:
    """Two users' PN GWs establishing one new PN ID at once: the one whose second half
    comes after the other's committed is refused with POLICY_DENIED (its pending state is
    left to expire), never merged into the other user's PN."""
    world = _OwnedWorld()

    def taken(message: Message) -> Message:
        if isinstance(message, AuthenticateResponse):
            world.pn_owners[PN_ID] = "bob"
        return message

    outcome = world.establish("pne-r1", ("pne-t1",), tamper=taken)
    assert world.inventory == {}
    assert len(world.pending) == 1
    assert outcome.joined("pne-r1") is None
    refusal = outcome.pne_failure("pne-r1")
    assert refusal is not None
    assert refusal.code is ErrorCode.POLICY_DENIED
