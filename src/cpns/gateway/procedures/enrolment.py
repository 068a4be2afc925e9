"""The PN GW's own enrolment: EUKey assignment for an entity with UI (004 §5.x.1).

The user gives the gateway their User ID and password (the CLI derives the password key);
the gateway runs :class:`~cpns.protocol.user_key_assignment.UserKeyAssignmentClient`
against the server (no Digest: the password proof is inside the request) and stores the
EUKey it receives in its key store's main map. The store keeps any PNE records it already
had; re-enrolling replaces the EUKey only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cpns.errors import ConfigurationError, ErrorCode, ProcedureRejected
from cpns.flow import new_flow, stamp
from cpns.gateway.config import GatewayConfig
from cpns.gateway.ledger import STORE_NAME, STORE_VERSION
from cpns.gateway.records import Enrolment
from cpns.gateway.upstream import ServerClient, Upstream
from cpns.logs import flow_scope
from cpns.messages.model import ErrorMessage, UserKeyAssignmentResponse
from cpns.protocol._machine import ProcedureFailed
from cpns.protocol.user_key_assignment import EUKeyReceived, UserKeyAssignmentClient
from cpns.runtime import SystemRandom, wall_time
from cpns.store.keystore import LocalKeyStore
from cpns.types import EntityKind, Random

__all__ = ["code_name", "enroll"]

log = logging.getLogger("cpns.gateway")


def code_name(code: ErrorCode | int) -> str:
    """A status as reported: the ErrorCode name, or the number of an unknown code."""
    return code.name if isinstance(code, ErrorCode) else str(code)


async def enroll(
    config: GatewayConfig,
    user_id: str,
    password_key: bytes,
    *,
    upstream: Upstream | None = None,
    rng: Random | None = None,
    clock: Callable[[], int] = wall_time,
) -> None:
    """Obtain the gateway's own EUKey from the server and store it (004 §5.x.1).

    Runs :class:`UserKeyAssignmentClient` (no Digest: the password proof is inside the
    request). The store keeps any PNE records it already had; re-enrolling replaces the
    EUKey only.

    Raises:
        ProcedureRejected: the server refused (its status), or its answer did not verify.
        TransportError: the server is unreachable.
        StoreError: the key store is in use by a running daemon, or cannot be written.
        ConfigurationError: the data directory belongs to another Entity ID.
    """
    with flow_scope(new_flow()):  # the PN GW starts its own enrolment flow
        await _enroll(config, user_id, password_key, upstream=upstream, rng=rng, clock=clock)


async def _enroll(
    config: GatewayConfig,
    user_id: str,
    password_key: bytes,
    *,
    upstream: Upstream | None,
    rng: Random | None,
    clock: Callable[[], int],
) -> None:
    rng = rng if rng is not None else SystemRandom()
    store = LocalKeyStore.open_or_create(config.data_dir, STORE_NAME)
    with store.lock():
        data = store.load()
        if data.get("entity_id") not in (None, config.entity_id):
            raise ConfigurationError(
                f"{config.data_dir} belongs to gateway {data['entity_id']!r}, "
                f"not {config.entity_id!r}"
            )
        machine = UserKeyAssignmentClient(
            entity_id=config.entity_id,
            entity_kind=EntityKind.PN_GW,
            server_id=config.server_id,
            rng=rng,
        )
        machine.start(user_id=user_id, password_key=password_key, now=clock())
        (request,) = machine.messages_to_send()
        request = stamp(request)
        log.info(
            "enrolling %s for user %s (txid %s)", config.entity_id, user_id, request.txid.hex()
        )
        owned = upstream is None
        client: Upstream = (
            upstream
            if upstream is not None
            else ServerClient(
                server_url=config.server_url,
                ca_file=config.ca_file,
                entity_id=config.entity_id,
                eukey=None,
                per_try_timeout=config.per_try_timeout,
                retries=config.retries,
            )
        )
        try:
            reply = await client.exchange(request)
        finally:
            if owned:
                assert isinstance(client, ServerClient)
                await client.aclose()
        hop = "gateway"
        if isinstance(reply, ErrorMessage):
            events = machine.fail(reply.status, "server answered with an ErrorMessage")
            hop = "server"
        else:
            if isinstance(reply, UserKeyAssignmentResponse) and reply.status is not ErrorCode.OK:
                hop = "server"  # the server's verdict; anything else we decided
            events = machine.receive(reply)
        for event in events:
            if isinstance(event, EUKeyReceived):
                enrolment = Enrolment(
                    entity_id=config.entity_id,
                    user_id=user_id,
                    eukey=event.eukey,
                    server_id=config.server_id,
                    enrolled_at=clock(),
                    version=STORE_VERSION,
                )
                data.update(enrolment.encode())  # PNE records kept here earlier stay
                store.save(data)
                log.info("enrolled %s (txid %s)", config.entity_id, request.txid.hex())
                return
            if isinstance(event, ProcedureFailed):
                log.warning(
                    "enrolment of %s refused: %s at %s (%s)",
                    config.entity_id,
                    code_name(event.code),
                    hop,
                    event.reason,
                )
                raise ProcedureRejected(event.code, event.reason, hop=hop)
        raise ProcedureRejected(ErrorCode.INTERNAL_ERROR, "no outcome", hop="gateway")
