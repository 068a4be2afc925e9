"""Checks shared by several procedures; each raises a RemoteProtocolError with its code."""

from __future__ import annotations

from cpns.errors import ErrorCode, RemoteProtocolError
from cpns.messages.model import Message

__all__ = ["check_addressed", "check_fresh", "check_reply_to"]


def check_fresh(sent_at: int, *, now: int, window: int) -> None:
    """003 §7.4.2.1.1.1 step 3 carries Time so that a stale request can be refused."""
    if abs(now - sent_at) > window:
        raise RemoteProtocolError(
            f"time {sent_at} is {now - sent_at:+d}s from now (window {window}s)",
            code=ErrorCode.STALE_TIME,
        )


def check_addressed(message: Message, *, to: str, sender: str | None = None) -> None:
    """The message is for ``to`` (and, if given, comes from ``sender``)."""
    if message.dst != to:
        raise RemoteProtocolError(
            f"addressed to {message.dst!r}, we are {to!r}", code=ErrorCode.WRONG_DESTINATION
        )
    if sender is not None and message.src != sender:
        raise RemoteProtocolError(
            f"from {message.src!r}, expected {sender!r}", code=ErrorCode.NOT_AUTHORIZED
        )


def check_reply_to(reply: Message, request: Message) -> None:
    """A reply answers our request: same transaction, from its destination, to its source."""
    if reply.txid != request.txid or reply.src != request.dst or reply.dst != request.src:
        raise RemoteProtocolError(
            "reply does not match the request's transaction or parties",
            code=ErrorCode.UNEXPECTED_MESSAGE,
        )
