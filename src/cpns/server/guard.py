"""Guards against guessing and floods by clients nobody has authenticated (D-SRV-1, D-SRV-2).

**Attempt limits (D-SRV-1).** Failed password proofs are counted under three keys per
procedure: the pair (User ID, source), the source across all User IDs, and the User ID
across all sources. A proof is refused unchecked with TOO_MANY_ATTEMPTS when any of them
reached its limit (``per_user_source`` L1, ``per_source`` L2, ``per_user`` L3). One source
adds at most L1 to a user's count before it is cut off for that user, so a stranger from
one source cannot lock the user out (that takes L3 / L1 distinct sources), while online
guessing against one user stays below L3 per window whatever the number of sources. A
source is the client's network address for unauthenticated requests and the
authenticated Entity ID otherwise.

**Cheap refusals (D-SRV-2).** Nothing on the path of an unauthenticated refusal writes to
the store: the failure counters and the audit of unauthenticated refusals are kept here,
in memory, and :meth:`AttemptGuard.flush` writes them in ONE transaction (called every
few seconds by the server and at shutdown): the counters added to the store's, and one
audit row per (procedure, outcome, source, User ID) with the number of refusals it stands
for. A flood costs O(distinct keys per flush interval) rows, not O(requests).

**Several processes (issue 7 item 2).** Each server process adds its counts to the
database's at each flush and judges a proof by the database total plus its own unflushed
counts; it never sees another process's unflushed counts. With N processes, limit L
and flush interval F (``audit_flush_interval``, 2 s by default), the failures accepted
for one key therefore stay below ``L + (N - 1) * r * F``, where ``r`` is the rate at which
one process receives failing proofs for that key, and never above ``N * L`` (each process
stops on its own at L). For the guessing bound L3 = 50 that is at most 50 + a few
seconds' worth of guesses per extra process; see docs/deployment.md.

Everything here runs on the server's event loop thread, except :meth:`AttemptGuard.refused`,
which a service that hands its store reads to a worker thread (PostgreSQL) calls there:
it only reads the counters, one dictionary lookup at a time, and :meth:`flush` makes the
counts it takes away visible as in flight before it removes them, so such a reader may
count a failure twice for an instant, never miss one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final

from cpns.errors import StoreError
from cpns.records import AuditEvent
from cpns.store.base import ServerStore, WriteTx

__all__ = ["AttemptGuard", "GuardLimits"]

log = logging.getLogger("cpns.server")

#: Source recorded when the caller did not give one (in-process use, tests).
LOCAL_SOURCE: Final = "local"
#: Source and User ID of the audit aggregate that takes keys beyond ``max_audit_keys``.
OVERFLOW: Final = "*"


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardLimits:
    """The limits of :class:`AttemptGuard` (``server.toml``, deviations D-SRV-1)."""

    #: L1: failed proofs for one User ID from one source.
    per_user_source: int = 5
    #: L2: failed proofs from one source, all User IDs together.
    per_source: int = 30
    #: L3: failed proofs for one User ID, all sources together: the online guessing bound.
    per_user: int = 50
    #: Seconds a failure keeps counting after the last one of its key.
    window: int = 900
    #: Most distinct audit aggregates held between flushes; more fold into one row.
    max_audit_keys: int = 10_000

    def __post_init__(self) -> None:
        for name in ("per_user_source", "per_source", "per_user"):
            if not 1 <= getattr(self, name) <= 1_000_000:
                raise ValueError(f"{name} must be 1..1000000")
        if not 1 <= self.window <= 7 * 86400:
            raise ValueError("window must be 1..604800 seconds")
        if self.max_audit_keys < 1:
            raise ValueError("max_audit_keys must be >= 1")


@dataclass(slots=True)
class _Aggregate:
    first_at: int
    last_at: int
    actor: str
    entity_id: str | None
    correlation_id: str | None
    detail: str
    count: int = 1
    flow_id: str | None = None


@dataclass(slots=True)
class _Pending:
    """Counter increments not yet in the store: key -> (count, time of the last one)."""

    counts: dict[str, int] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, now: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1
        self.last[key] = now


type _AuditKey = tuple[str, str, str, str | None]


class AttemptGuard:
    """Failure counters per (user, source), source and user; aggregated refusal audit."""

    def __init__(self, store: ServerStore, limits: GuardLimits | None = None) -> None:
        self._store = store
        self.limits = limits or GuardLimits()
        self._pending = _Pending()
        self._inflight = _Pending()
        self._audit: dict[_AuditKey, _Aggregate] = {}
        self._inflight_audit: dict[_AuditKey, _Aggregate] = {}

    @staticmethod
    def keys(procedure: str, user_id: str, source: str | None) -> tuple[str, str, str]:
        """Counter keys (user+source, source, user) of one proof."""
        src = source or LOCAL_SOURCE
        return (
            f"{procedure}/us/{src}/{user_id}",
            f"{procedure}/s/{src}",
            f"{procedure}/u/{user_id}",
        )

    def _count(self, key: str, now: int) -> int:
        return (
            self._store.auth_failures(key, now=now)
            + self._pending.counts.get(key, 0)
            + self._inflight.counts.get(key, 0)
        )

    def refused(self, procedure: str, user_id: str, source: str | None, *, now: int) -> bool:
        """Whether a proof for ``user_id`` from ``source`` must be refused unchecked.

        Always reads the same three counters, whoever the user and whether it exists.
        """
        pair, src, user = self.keys(procedure, user_id, source)
        limits = self.limits
        by_pair = self._count(pair, now) >= limits.per_user_source
        by_source = self._count(src, now) >= limits.per_source
        by_user = self._count(user, now) >= limits.per_user
        return by_pair or by_source or by_user

    def failed(self, procedure: str, user_id: str, source: str | None, *, now: int) -> None:
        """Count one failed proof under its three keys (in memory until the next flush)."""
        for key in self.keys(procedure, user_id, source):
            self._pending.add(key, now)

    def succeeded(self, tx: WriteTx, procedure: str, user_id: str, source: str | None) -> str:
        """In the success's own transaction: forget this source's failures for the user.

        Only the (user, source) pair is reset: the per-user and per-source counts keep
        running, so a success cannot reset the guessing bound. Returns the pair key, which
        the caller passes to :meth:`forget` once the transaction committed.
        """
        pair = self.keys(procedure, user_id, source)[0]
        tx.clear_auth_failures(pair)
        return pair

    def forget(self, key: str) -> None:
        """Drop unflushed failures of ``key`` (after a committed success)."""
        self._pending.counts.pop(key, None)
        self._pending.last.pop(key, None)

    def refusal(
        self,
        *,
        procedure: str,
        outcome: str,
        source: str | None,
        user_id: str | None,
        actor: str,
        entity_id: str | None,
        correlation_id: str | None,
        detail: str,
        now: int,
        flow_id: str | None = None,
    ) -> None:
        """Note one unauthenticated refusal in the audit aggregate (written at flush)."""
        key: _AuditKey = (procedure, outcome, source or LOCAL_SOURCE, user_id)
        agg = self._audit.get(key)
        if agg is None and len(self._audit) >= self.limits.max_audit_keys:
            key = (procedure, outcome, OVERFLOW, None)
            agg = self._audit.get(key)
            if agg is None:
                detail = "distinct sources/users beyond max_audit_keys in this interval"
        if agg is None:
            self._audit[key] = _Aggregate(
                first_at=now,
                last_at=now,
                actor=actor,
                entity_id=entity_id,
                correlation_id=correlation_id,
                detail=detail,
                flow_id=flow_id,
            )
        else:
            agg.count += 1
            agg.last_at = now

    @property
    def unflushed(self) -> int:
        """Counter keys and audit aggregates waiting for the next flush."""
        return len(self._pending.counts) + len(self._audit)

    async def flush(self) -> int:
        """Write the counters and audit aggregates gathered since the last flush.

        ONE transaction, however many requests they stand for. Returns the number of
        audit rows written. On a store failure the gathered state is kept for the next
        flush.
        """
        if not self._pending.counts and not self._audit:
            return 0
        pending, audit = self._pending, self._audit
        # In flight first, then taken away: a reader on another thread never misses them.
        self._inflight, self._inflight_audit = pending, audit
        self._pending, self._audit = _Pending(), {}
        window = self.limits.window

        def write(tx: WriteTx) -> int:
            # In key order: two processes flushing the same keys lock their rows in the
            # same order, so their transactions cannot deadlock (PostgreSQL).
            for key in sorted(pending.counts):
                count = pending.counts[key]
                tx.record_auth_failure(key, now=pending.last[key], window=window, count=count)
            for (procedure, outcome, source, user_id), agg in audit.items():
                tx.audit(_event(procedure, outcome, source, user_id, agg))
            return len(audit)

        try:
            rows = await self._store.write_async(write)
        except StoreError as exc:
            log.warning("cannot flush failure counters and audit aggregates: %s", exc)
            self._merge_back(pending, audit)
            return 0
        finally:
            self._inflight, self._inflight_audit = _Pending(), {}
        if rows:
            log.info(
                "%d unauthenticated refusals written as %d audit rows",
                sum(a.count for a in audit.values()),
                rows,
            )
        return rows

    def _merge_back(self, pending: _Pending, audit: dict[_AuditKey, _Aggregate]) -> None:
        for key, count in pending.counts.items():
            self._pending.counts[key] = self._pending.counts.get(key, 0) + count
            self._pending.last[key] = max(self._pending.last.get(key, 0), pending.last[key])
        for akey, agg in audit.items():
            mine = self._audit.get(akey)
            if mine is None:
                self._audit[akey] = agg
            else:
                mine.count += agg.count
                mine.first_at = min(mine.first_at, agg.first_at)


def _event(
    procedure: str, outcome: str, source: str, user_id: str | None, agg: _Aggregate
) -> AuditEvent:
    detail = agg.detail
    if agg.count > 1:
        detail = f"{detail} ({agg.count} refusals, last at {agg.last_at})"
    return AuditEvent(
        at=agg.first_at,
        actor=agg.actor,
        procedure=procedure,
        outcome=outcome,
        entity_id=agg.entity_id,
        user_id=user_id,
        hop="server",
        correlation_id=agg.correlation_id,
        detail=detail,
        count=agg.count,
        source=source,
        flow_id=agg.flow_id,
    )
