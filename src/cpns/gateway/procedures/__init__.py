"""The PN GW's procedures: one coordinator per procedure.

A coordinator drives the sans-I/O machines of :mod:`cpns.protocol` for one procedure and
does its I/O through small interfaces only: :class:`PAN` (the PAN side, implemented by
:class:`cpns.gateway.pan.PANSide`), :class:`~cpns.gateway.upstream.Upstream` (the server
link) and :class:`~cpns.gateway.ledger.PNELedger` (the stored PNE records). Each module
reads as the procedure's section of the standard:

* :mod:`.enrolment`: the gateway's own EUKey from the server, for an entity with UI
  (004 §5.x.1);
* :mod:`.eukey_assignment`: the EUKey assignment for a PNE without UI (003 §7.4.2.1.1),
  its request to the server and its delivery to the PNE over the PAN;
* :mod:`.pne_enrolment`: the relay of a PNE's own EUKey assignment with UI (004 §5.x.1):
  its request from the PAN to the server and the server's answer back, unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from cpns.errors import ErrorCode
from cpns.messages.model import Message

__all__ = ["PAN", "Link"]


class Link(Protocol):
    """One PAN link, as a procedure sees it."""

    #: The PNE it announced (None before its PNEHello).
    pne_id: str | None
    #: The peer's address, for logs.
    peer: str

    @property
    def name(self) -> str:
        """The PNE ID it announced, or ``?``."""
        ...

    async def send(self, message: Message, *, level: int = logging.INFO) -> bool:
        """Write one message; False if the peer is gone."""
        ...


class PAN(Protocol):
    """What a procedure asks of the PAN side."""

    def links(self, pne_id: str) -> Sequence[Link]:
        """The live links announcing ``pne_id``."""
        ...

    def hello_flow(self, pne_id: str) -> str | None:
        """The flow ID of the PNE's latest PNEHello, if it is attached."""
        ...

    def log_allowed(self) -> bool:
        """Whether a line caused by a PAN peer may be written now."""
        ...

    async def refuse(self, link: Link, code: ErrorCode, txid: bytes = ...) -> None:
        """Answer a peer's frame with an ErrorMessage."""
        ...

    def peer_fault(self, link: Link, what: str, detail: str = "") -> None:
        """Log (within budget) and count what a PAN peer did wrong."""
        ...
