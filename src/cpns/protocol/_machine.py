"""What every procedure state machine shares: the table-driven ``receive`` and the outbox.

A machine is built with the stored facts it needs, fed typed messages, and hands back
events (facts to persist, outcomes) plus messages to send. Transitions are data: each
role class has a ``TRANSITIONS`` mapping ``(state, message class) -> (handler, next
state)``; a pair not in the table is an :class:`~cpns.errors.UnexpectedMessage` and
moves the machine to ``FAILED`` (STYLE §5, after h2's stream table).

Remote faults never escape :meth:`Machine.receive`: a handler raises a
:class:`~cpns.errors.RemoteProtocolError`, the machine moves to ``FAILED``, queues the
reply the procedure requires (if any) and returns a :class:`ProcedureFailed` event.
After ``DONE`` or ``FAILED`` every call raises :class:`~cpns.errors.LocalProtocolError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from cpns.errors import ErrorCode, LocalProtocolError, RemoteProtocolError, UnexpectedMessage
from cpns.messages.model import Message

__all__ = [
    "Event",
    "Machine",
    "NonceConsumed",
    "ProcedureFailed",
    "Transitions",
    "render_transitions",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base class of everything a machine reports (named in the past tense)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcedureFailed(Event):
    """The procedure ended in failure.

    ``code`` is what the peer was (or will be) told; ``reason`` is precise and internal:
    it goes to logs and the audit trail, never to the peer.
    """

    #: The wire status.
    code: ErrorCode | int
    #: Internal reason.
    reason: str
    #: Which party decided: "server", "gateway", "device" (DESIGN §5: errors name the hop).
    hop: str


@dataclass(frozen=True, slots=True, kw_only=True)
class NonceConsumed(Event):
    """A random value was used and must be remembered until ``expires_at`` (replay guard)."""

    #: The random value.
    nonce: bytes
    #: Wall-clock seconds after which a replay would be refused as stale anyway.
    expires_at: int


type Handler[M] = Callable[[M, Message], list[Event]]
type Transitions[S, M] = Mapping[tuple[S, type[Message]], tuple[Handler[M], S]]


class Machine[S: Enum]:
    """Base of every role class. Subclasses set ``TRANSITIONS``, ``HOP`` and the states."""

    TRANSITIONS: ClassVar[
        Mapping[tuple[Enum, type[Message]], tuple[Callable[..., list[Event]], Enum]]
    ]
    #: The hop name used in :class:`ProcedureFailed`.
    HOP: ClassVar[str]

    def __init__(self, initial: S, *, done: S, failed: S) -> None:
        self._state = initial
        self._done = done
        self._failed = failed
        self._outbox: list[Message] = []

    @property
    def state(self) -> S:
        """The current state."""
        return self._state

    @property
    def terminal(self) -> bool:
        """Whether the machine reached DONE or FAILED."""
        return self._state in (self._done, self._failed)

    def messages_to_send(self) -> list[Message]:
        """Drain and return the outbox."""
        out, self._outbox = self._outbox, []
        return out

    def _send(self, message: Message) -> None:
        self._outbox.append(message)

    def _check_live(self) -> None:
        if self.terminal:
            raise LocalProtocolError(f"{type(self).__name__} is {self._state.name}")

    def _failure_reply(self, incoming: Message | None, code: ErrorCode) -> Message | None:
        """The message the procedure sends when it fails on ``incoming`` (None: nothing)."""
        return None

    def fail(self, code: ErrorCode, reason: str, incoming: Message | None = None) -> list[Event]:
        """Move to FAILED, queue the failure reply, and report :class:`ProcedureFailed`."""
        self._check_live()
        return self._enter_failed(code, reason, incoming)

    def _enter_failed(self, code: ErrorCode, reason: str, incoming: Message | None) -> list[Event]:
        self._state = self._failed
        reply = self._failure_reply(incoming, code)
        if reply is not None:
            self._send(reply)
        return [ProcedureFailed(code=code, reason=reason, hop=self.HOP)]

    def receive(self, message: Message) -> list[Event]:
        """Feed one decoded message; return the events it caused.

        Raises :class:`LocalProtocolError` if the machine is already terminal. Any fault
        of the peer ends in FAILED and a :class:`ProcedureFailed` event instead.
        """
        self._check_live()
        entry = self.TRANSITIONS.get((self._state, type(message)))
        try:
            if entry is None:
                raise UnexpectedMessage(f"{message.TYPE.name} not expected in {self._state.name}")
            handler, next_state = entry
            events = handler(self, message)
        except RemoteProtocolError as exc:
            return self._enter_failed(exc.code, exc.reason, message)
        self._state = next_state  # type: ignore[assignment]  # table values are states of S
        return events


def render_transitions(cls: type[Machine[Any]]) -> str:
    """The transition table of a role class as Markdown (docs/procedures/ embed it)."""
    rows = ["| state | message | handler | next state |", "|---|---|---|---|"]
    for (state, message_cls), (handler, next_state) in cls.TRANSITIONS.items():
        rows.append(
            f"| {state.name} | {message_cls.__name__} | `{handler.__name__}` | {next_state.name} |"
        )
    rows.append("| any other pair | | | FAILED (`UNEXPECTED_MESSAGE`) |")
    return "\n".join(rows)
