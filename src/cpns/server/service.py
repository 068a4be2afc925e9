"""The server's service layer: load records, run the core, persist, reply (STYLE §7).

For each CPNS message the HTTP layer hands over, :class:`CPNSService`:

1. answers a retried transaction with the reply it already sent (idempotent retries,
   DESIGN §5), and refuses a reused transaction ID with other content as a replay;
2. builds the procedure's server machine with synchronous store lookups (and the stored
   state a later step continues from: the procedure's ``load``), feeds it the message and
   collects its events and reply;
3. persists every fact the events carry (nonce used, EUKey or chain assigned, the reply
   itself, the audit record) in ONE durable, group-committed transaction, and only then
   returns the reply (DESIGN §6: facts are persisted before the reply that depends on them);
   a write that loses a compare and set is run again from fresh reads when the procedure
   asks for it (``rerun_on_conflict``), else refused.

It knows nothing of HTTP or Digest: the caller says which entity authenticated. Nor does
it know any procedure by name: each request's procedure (its machine, whether it is open,
how its events are persisted, its audit name) comes from the registry in
:mod:`cpns.server.procedures`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from cpns import metrics
from cpns.errors import DecodeError, ErrorCode
from cpns.flow import flow_hex, log_hop, message_scope, stamp
from cpns.logs import peer_text
from cpns.messages.codec import decode, encode, encode_without_flow, peek_header
from cpns.messages.constants import TXID_LEN
from cpns.messages.model import ErrorMessage, Message
from cpns.protocol._machine import Event, Machine, NonceConsumed, ProcedureFailed
from cpns.protocol.key_assignment import AssignmentPolicy, ServerLookups
from cpns.records import AuditEvent, StoredReply
from cpns.server.guard import AttemptGuard, GuardLimits
from cpns.server.procedures import MachineContext, Procedure, procedure_for
from cpns.store.base import ClaimConflict, ConflictError, NonceReused, ServerStore, WriteTx
from cpns.types import Random

__all__ = ["CPNSService", "Reply"]

#: How many times a request whose compare and set lost a race is run again (its
#: procedure's ``rerun_on_conflict``) before it is refused as an ordinary lost race.
_MAX_RERUNS = 3
#: Refusals a concurrent copy of the same request can cause between the stored-reply check
#: and the procedure's reads (a nonce it used, the pending establishment it finished): the
#: stored reply is looked up again before such a refusal is sent.
_RACED: Final = frozenset({ErrorCode.REPLAY, ErrorCode.UNKNOWN_ESTABLISHMENT})


class _Rerun(Exception):
    """Internal: the request's write lost a compare and set; run it again."""


log = logging.getLogger("cpns.server")

#: Refusals that mean "the password proof did not verify": counted against the User ID
#: and the source (D-SRV-1).
_PROOF_FAILURES: frozenset[ErrorCode | int] = frozenset(
    {ErrorCode.WRONG_PASSWORD, ErrorCode.AUTHENTICATION_FAILED}
)


@dataclass(frozen=True, slots=True)
class Reply:
    """What to answer: an HTTP status and an encoded CPNS message."""

    #: 200 for a protocol answer (whatever its status), 400 for undecodable input.
    http_status: int
    #: The encoded reply message.
    body: bytes
    #: The reply's protocol status, for logs and metrics.
    status: ErrorCode | int
    #: A short reason for a refusal of undecodable input (sent as ``CPNS-Reason``).
    reason: str = ""
    #: The reply message, for the log (None for a stored reply sent again).
    message: Message | None = dataclasses.field(default=None, repr=False, compare=False)


class CPNSService:
    """Runs the server side of every procedure over a :class:`ServerStore`."""

    def __init__(
        self,
        *,
        store: ServerStore,
        policy: AssignmentPolicy,
        rng: Random,
        clock: Callable[[], int],
        guard: AttemptGuard | None = None,
        offload_reads: bool = False,
    ) -> None:
        #: Run each request's store reads (reply lookup, the procedure with its lookups) in
        #: a worker thread: for a store whose reads are network round trips (PostgreSQL),
        #: so the event loop never waits on one. SQLite reads are cheaper than the hand-off.
        self._offload_reads = offload_reads
        self._store = store
        self._policy = policy
        self._rng = rng
        self._clock = clock
        #: Failed-proof limits per (user, source), source and user (D-SRV-1); by default
        #: the policy's ``max_auth_failures`` is the per-user bound.
        self.guard = guard or AttemptGuard(
            store,
            GuardLimits(per_user=policy.max_auth_failures, window=policy.auth_failure_window),
        )

    def _lookups(self, procedure: str, source: str | None, now: int) -> ServerLookups:
        """The store reads of one request; failures as the guard sees them for ``source``.

        Counters are kept per procedure, so a flood of bad enrolments (unauthenticated)
        cannot lock a user's enrolled PN GW out of 003 (deviations D-SRV-1).
        """
        limit = self._policy.max_auth_failures

        def failures(user_id: str) -> int:
            return limit if self.guard.refused(procedure, user_id, source, now=now) else 0

        return ServerLookups(
            get_user=self._store.get_user,
            get_entity=self._store.get_entity,
            get_tk=self._store.get_tk,
            nonce_used=self._store.nonce_used,
            auth_failures=failures,
        )

    async def _read[T](self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, in a worker thread if reads are offloaded (``offload_reads``)."""
        if self._offload_reads:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def flush(self) -> int:
        """Write the guard's counters and audit aggregates (see :mod:`cpns.server.guard`)."""
        return await self.guard.flush()

    @property
    def server_id(self) -> str:
        """This server's Entity ID."""
        return self._policy.server_id

    def parse(self, body: bytes) -> Message | Reply:
        """Decode a request; a :class:`Reply` (HTTP 400) if it is not a CPNS message.

        The refusal is an ErrorMessage with the decoder's specific code (DecodeError.code),
        echoing the request's txid and addressed to its source when those two header
        fields can still be read (best effort, :func:`cpns.messages.codec.peek_header`);
        else a zero txid and "unknown". The reply's ``reason`` is the decoder's short
        reason (bounded), sent as the ``CPNS-Reason`` HTTP header.
        """
        try:
            return decode(body)
        except DecodeError as exc:
            txid, source = peek_header(body)
            log.info(
                "undecodable request: %s", peer_text(exc.reason), extra={"status": exc.code.name}
            )
            metrics.SERVER_REQUESTS.labels("undecodable", exc.code.name).inc()
            try:
                error = ErrorMessage(
                    txid=txid or bytes(TXID_LEN),
                    src=self.server_id,
                    dst=source or "unknown",
                    status=exc.code,
                )
            except ValueError:  # a source the model refuses as a destination
                error = ErrorMessage(
                    txid=txid or bytes(TXID_LEN), src=self.server_id, dst="unknown", status=exc.code
                )
            return Reply(400, encode(error), exc.code, reason=exc.reason)

    @staticmethod
    def requires_authentication(message: Message) -> bool:
        """Whether the sender must be Digest-authenticated (004 §5.x.2) to send this."""
        procedure = procedure_for(message)
        return procedure is None or not procedure.open

    def _machine(
        self,
        message: Message,
        authenticated: str | None,
        now: int,
        source: str | None = None,
        *,
        load: bool = False,
    ) -> Machine[Any]:
        """The server machine of the procedure ``message`` starts; LookupError if none.

        With ``load``, the procedure's stored state is read first (its ``load``) and
        handed to the machine; without, the machine is only good for refusing the request.
        The guard counts an open request's failures for its network ``source``, an
        authenticated one's for the authenticated entity."""
        procedure = procedure_for(message)
        if procedure is None:
            raise LookupError(type(message).__name__)
        counted = source if procedure.open else authenticated
        loaded = None
        if load and procedure.load is not None:
            loaded = procedure.load(self._store, message, authenticated)
        return procedure.machine(
            MachineContext(
                policy=self._policy,
                lookups=self._lookups(procedure.name, counted, now),
                rng=self._rng,
                now=now,
                authenticated=authenticated,
                loaded=loaded,
                get_pn_owner=self._store.get_pn_owner,
            )
        )

    async def handle(
        self,
        message: Message,
        *,
        authenticated: str | None,
        source: str | None = None,
        encoded: bytes | None = None,
    ) -> Reply:
        """Run one request through its procedure and return the reply to send.

        ``source`` is the client's network address (the HTTP layer's peer address): the
        guessing guard counts unauthenticated failures per source (D-SRV-1). An
        authenticated request's source is its Entity ID.

        ``encoded``: the bytes ``message`` was decoded from (:meth:`parse`), if the caller
        has them; the request's digest (retry or replay) is then taken from them instead
        of encoding the message again.

        The request is handled in its flow (docs/logging.md): every log line carries the
        request's flow ID, the reply echoes it, and one line each logs the request
        received and the reply sent (for an unauthenticated request, written after the
        outcome, and at DEBUG unless it succeeded: D-SRV-2).

        Counted in :mod:`cpns.metrics`: the request by procedure and reply status, its
        duration, and the steps in progress.
        """
        procedure = _name(message, "unexpected")
        started = time.perf_counter()
        metrics.SERVER_PENDING.inc()
        with message_scope(message):
            peer = _peer_party(message)
            if authenticated is not None:
                log_hop(log, "received", message, peer)
            try:
                reply = await self._handle(
                    message, authenticated=authenticated, source=source, encoded=encoded
                )
            finally:
                metrics.SERVER_PENDING.dec()
                metrics.SERVER_REQUEST_DURATION.labels(procedure).observe(
                    time.perf_counter() - started
                )
            metrics.SERVER_REQUESTS.labels(procedure, _status_name(reply.status)).inc()
            level = logging.INFO
            if authenticated is None:
                # Nobody authenticated it: a refusal writes no line of its own (D-SRV-2),
                # so both hop lines are decided, and written, once the outcome is known.
                level = logging.INFO if reply.status is ErrorCode.OK else logging.DEBUG
                log_hop(log, "received", message, peer, level=level)
            if log.isEnabledFor(level):
                sent = reply.message if reply.message is not None else decode(reply.body)
                log_hop(log, "sent", sent, peer, level=level)
            return reply

    async def _handle(
        self,
        message: Message,
        *,
        authenticated: str | None,
        source: str | None,
        encoded: bytes | None = None,
    ) -> Reply:
        now = self._clock()
        if authenticated is not None:
            source = authenticated
        requester = authenticated or message.src
        # The flow ID is not a security input (docs/wire.md 2.3): a retry is told from a
        # reused txid by the request without it.
        digest = hashlib.sha256(encode_without_flow(message, encoded)).digest()
        procedure = procedure_for(message)
        reruns = _MAX_RERUNS if procedure is not None and procedure.rerun_on_conflict else 0
        while True:
            try:
                return await self._attempt(
                    message, authenticated, requester, digest, now, source, rerun=reruns > 0
                )
            except _Rerun:
                # Its compare and set lost to another process (or a racing copy): run it
                # again from what is stored now (a stored reply, a finished establishment).
                reruns -= 1

    async def _attempt(
        self,
        message: Message,
        authenticated: str | None,
        requester: str,
        digest: bytes,
        now: int,
        source: str | None,
        *,
        rerun: bool,
    ) -> Reply:
        """One run of a request (:class:`_Rerun` if it should run again: ``rerun``)."""
        if (answered := await self._stored_answer(message, digest, requester)) is not None:
            return answered
        try:
            machine = await self._read(
                functools.partial(self._machine, load=True),
                message,
                authenticated,
                now,
                source,
            )
        except LookupError:
            # A well-formed message no server procedure starts with (a response, a PAN message).
            error = ErrorMessage(
                txid=message.txid,
                src=self.server_id,
                dst=message.src,
                flow=message.flow,
                status=ErrorCode.UNEXPECTED_MESSAGE,
            )
            await self._audit(
                message,
                requester,
                ErrorCode.UNEXPECTED_MESSAGE,
                now,
                "no server procedure starts with this message",
                source,
                authenticated=authenticated is not None,
            )
            return Reply(200, encode(error), ErrorCode.UNEXPECTED_MESSAGE, message=error)
        # The procedure reads the store through its lookups (and the guard's counters).
        events = await self._read(machine.receive, message)
        [reply] = machine.messages_to_send()
        failed = next((e for e in events if isinstance(e, ProcedureFailed)), None)
        if failed is not None and failed.code in _RACED:
            # The nonce was used (or the pending establishment finished) between our
            # stored-reply check and the procedure's lookups: by a concurrent copy of this
            # very request (another process, a retry), which then answered: answer as it
            # did (issue 7 item 2; PN Establishment's second half likewise).
            if (answered := await self._stored_answer(message, digest, requester)) is not None:
                return answered
        if failed is not None:
            await self._audit(
                message,
                requester,
                failed.code,
                now,
                failed.reason,
                source,
                authenticated=authenticated is not None,
            )
            return self._reply(reply, failed.code)
        reply = stamp(reply)
        reply_bytes = encode(reply)
        try:
            cleared = await self._store.write_async(
                lambda tx: self._persist(
                    tx, message, requester, digest, reply, reply_bytes, events, now, source
                )
            )
        except ConflictError as exc:
            if rerun:
                # A compare and set lost to a concurrent commit (another process, a racing
                # copy of this request): nothing was written; run the request again.
                raise _Rerun from None
            if isinstance(exc, ClaimConflict):
                # Another assignment of this entity committed after our checks read it:
                # the first one wins, this one gets a refusal and no key material.
                return await self._lost_race(
                    message, authenticated, requester, now, source, ErrorCode.CLAIM_CONFLICT
                )
            return await self._raced_copy(message, authenticated, requester, digest, now, source)
        except NonceReused:
            return await self._raced_copy(message, authenticated, requester, digest, now, source)
        if cleared is not None:
            self.guard.forget(cleared)
        procedure = procedure_for(message)
        assert procedure is not None  # only a procedure's request gets this far
        # One increment per (flow, status) rather than one per PNE: the same counts.
        outcomes = procedure.pne_outcomes(reply)
        tally = Counter((o.flow or "none", _status_name(o.status)) for o in outcomes)
        for (flow, status_name), count in tally.items():
            metrics.SERVER_PNE_OUTCOMES.labels(procedure.name, flow, status_name).inc(count)
        status = _reply_status(reply)
        log.info(
            "%s %s for %s",
            _name(message),
            _status_name(status),
            requester,
            extra={"txid": message.txid.hex(), "entity": requester, "status": _status_name(status)},
        )
        return Reply(200, reply_bytes, status, message=reply)

    async def _raced_copy(
        self,
        message: Message,
        authenticated: str | None,
        requester: str,
        digest: bytes,
        now: int,
        source: str | None,
    ) -> Reply:
        """A concurrent copy of this very request may have won the race: answer as it
        did; else the request is refused as a replay."""
        if (answered := await self._stored_answer(message, digest, requester)) is not None:
            return answered
        return await self._lost_race(
            message, authenticated, requester, now, source, ErrorCode.REPLAY
        )

    async def _lost_race(
        self,
        message: Message,
        authenticated: str | None,
        requester: str,
        now: int,
        source: str | None,
        code: ErrorCode,
    ) -> Reply:
        """The refusal of a request whose write lost a race (REPLAY: a random value used
        concurrently; CLAIM_CONFLICT: the entity changed after its checks)."""
        reason = {
            ErrorCode.REPLAY: "random value used concurrently",
            ErrorCode.CLAIM_CONFLICT: "another assignment committed first",
        }[code]
        fresh = self._machine(message, authenticated, now, source)
        fresh.fail(code, reason, message)
        await self._audit(
            message, requester, code, now, reason, source, authenticated=authenticated is not None
        )
        return self._reply(fresh.messages_to_send()[0], code)

    async def _stored_answer(self, message: Message, digest: bytes, requester: str) -> Reply | None:
        """The answer to a transaction that already has a stored reply (a retry, or a
        replay of its txid), or None if it has none yet."""
        stored = await self._read(self._store.get_reply, requester, message.txid)
        if stored is None:
            return None
        return self._replay_or_retry(stored, message, digest, requester)

    def _replay_or_retry(
        self, stored: StoredReply, message: Message, digest: bytes, requester: str
    ) -> Reply:
        if stored.request_digest == digest:
            metrics.SERVER_RETRIES_ANSWERED.labels(_name(message, "unexpected")).inc()
            log.info(
                "retry of %s answered from the stored reply",
                message.txid.hex(),
                extra={"txid": message.txid.hex(), "entity": requester},
            )
            return Reply(200, stored.reply, ErrorCode.OK)
        procedure = procedure_for(message)
        fresh = self._machine(
            message, None if procedure is None or procedure.open else requester, self._clock()
        )
        fresh.fail(ErrorCode.REPLAY, "transaction ID reused with other content", message)
        return self._reply(fresh.messages_to_send()[0], ErrorCode.REPLAY)

    @staticmethod
    def _reply(message: Message, code: ErrorCode | int) -> Reply:
        message = stamp(message)
        return Reply(200, encode(message), code, message=message)

    def _persist(
        self,
        tx: WriteTx,
        message: Message,
        requester: str,
        digest: bytes,
        reply: Message,
        reply_bytes: bytes,
        events: list[Event],
        now: int,
        source: str | None,
    ) -> str | None:
        """Write every fact of a successful step in the caller's transaction: its events'
        facts, the reply (for retries), the audit row of the request and one per PNE
        outcome the reply carries.

        Returns the guard counter key this success reset, if any.
        """
        procedure = procedure_for(message)
        assert procedure is not None  # only a procedure's request gets this far
        for event in events:
            if isinstance(event, NonceConsumed):
                tx.use_nonce(event.nonce, expires_at=event.expires_at)
            else:
                procedure.persist(tx, event, now)
        tx.put_reply(
            StoredReply(
                requester=requester,
                txid=message.txid,
                request_digest=digest,
                reply=reply_bytes,
                created_at=now,
            )
        )
        user_id = getattr(message, "user_id", None)
        cleared = None
        if user_id is not None:
            cleared = self.guard.succeeded(tx, procedure.name, user_id, source)
        tx.audit(_audit_event(message, requester, _reply_status(reply), now, ""))
        outcomes = procedure.pne_outcomes(reply)
        if outcomes:
            # One row per PNE, in one batched statement; the fields shared by every row
            # are worked out once.
            name = _name(message)
            user_id = getattr(message, "user_id", None)
            correlation_id = message.txid.hex()
            flow_id = flow_hex(message.flow)
            tx.audit_many(
                [
                    AuditEvent(
                        at=now,
                        actor=requester,
                        procedure=name,
                        outcome=_outcome_name(outcome.status),
                        entity_id=outcome.pne_id,
                        user_id=user_id,
                        hop="server",
                        correlation_id=correlation_id,
                        flow_id=flow_id,
                        detail=f"flow {outcome.flow}" if outcome.flow else "",
                    )
                    for outcome in outcomes
                ]
            )
        return cleared

    async def _audit(
        self,
        message: Message,
        requester: str,
        code: ErrorCode | int,
        now: int,
        reason: str,
        source: str | None,
        *,
        authenticated: bool,
    ) -> None:
        name = code.name if isinstance(code, ErrorCode) else str(code)
        user_id = getattr(message, "user_id", None)
        known = procedure_for(message) is not None
        procedure = _name(message)
        if code in _PROOF_FAILURES and known:
            metrics.SERVER_PASSWORD_PROOF_FAILURES.labels(procedure).inc()
        if code in _PROOF_FAILURES and user_id is not None and known:
            # Counted in memory, written in batches by the guard's flush (D-SRV-2).
            self.guard.failed(procedure, user_id, source, now=now)
        if not authenticated:
            # Nobody authenticated this request: it costs no store write and no log line
            # of its own. It joins the in-memory aggregate of its (procedure, outcome,
            # source, User ID), written as ONE audit row with a count at the next flush,
            # so a flood grows the database by its distinct keys, not its requests (D-SRV-2).
            log.debug(
                "%s refused for %s: %s (%s)",
                type(message).__name__,
                requester,
                name,
                reason,
                extra={"txid": message.txid.hex(), "entity": requester, "status": name},
            )
            self.guard.refusal(
                procedure=procedure,
                outcome=name,
                source=source,
                user_id=user_id,
                actor=requester,
                entity_id=getattr(message, "pne_id", None) or message.src,
                correlation_id=message.txid.hex(),
                flow_id=flow_hex(message.flow),
                detail=reason,
                now=now,
            )
            return
        log.info(
            "%s refused for %s: %s (%s)",
            type(message).__name__,
            requester,
            name,
            reason,
            extra={"txid": message.txid.hex(), "entity": requester, "status": name},
        )
        event = _audit_event(message, requester, code, now, reason)
        await self._store.write_async(lambda tx: tx.audit(event))


def _reply_status(reply: Message) -> ErrorCode | int:
    """The protocol status a reply carries (OK for a reply without one)."""
    status: ErrorCode | int = getattr(reply, "status", ErrorCode.OK)
    return status


def _status_name(code: ErrorCode | int) -> str:
    """A reply status as a metric label: the ErrorCode name (a bounded set)."""
    return code.name if isinstance(code, ErrorCode) else "UNKNOWN"


def _outcome_name(code: ErrorCode | int) -> str:
    """An outcome as the audit trail names it: the ErrorCode name, else the number."""
    return code.name if isinstance(code, ErrorCode) else str(code)


def _audit_event(
    message: Message, requester: str, code: ErrorCode | int, now: int, detail: str
) -> AuditEvent:
    subject = getattr(message, "pne_id", None) or message.src
    return AuditEvent(
        at=now,
        actor=requester,
        procedure=_name(message),
        outcome=_outcome_name(code),
        entity_id=subject,
        user_id=getattr(message, "user_id", None),
        hop="server",
        correlation_id=message.txid.hex(),
        flow_id=flow_hex(message.flow),
        detail=detail,
    )


def _name(message: Message, unknown: str | None = None) -> str:
    """The audit name of the procedure ``message`` starts; for a message no procedure
    starts, ``unknown`` (by default the message type's name)."""
    procedure: Procedure | None = procedure_for(message)
    if procedure is not None:
        return procedure.name
    return unknown if unknown is not None else type(message).__name__


def _peer_party(message: Message) -> Literal["gateway", "pne"]:
    """Who sent a request (its procedure says); a PN GW for anything else."""
    procedure = procedure_for(message)
    return procedure.party(message) if procedure is not None else "gateway"
