"""The PN GW's PAN side: the TCP listener, its links and the PNEs attached to them.

A PNE attaches with :class:`PNEHello` (``dst`` is the literal ``"pan"``: whichever PN GW
answers the link) and :class:`PANSide` keeps a routing table Entity ID -> live links
(several: a hello proves nothing, so a new one never ends a live link, D-PAN-1). One
framed CPNS message per frame (:mod:`cpns.transport.stream`). Timeouts and caps bound idle
and excess links (D-PAN-3). Undecodable frames or unexpected messages get an
:class:`ErrorMessage` and that link is closed, with one bounded log line (D-PAN-4);
nothing a peer sends can stop the daemon.

The PAN side knows no procedure: each procedure subscribes (:meth:`PANSide.subscribe`)
the message types it handles from attached links, and may ask to hear of every attach
(so it can offer what it holds for the PNE).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from cpns import metrics
from cpns.errors import ConfigurationError, DecodeError, ErrorCode
from cpns.flow import log_hop, message_scope, stamp
from cpns.gateway.config import GatewayConfig
from cpns.gateway.connections import Connections
from cpns.gateway.procedures import Link
from cpns.logs import LogBudget
from cpns.messages.constants import TXID_LEN
from cpns.messages.model import ErrorMessage, Message, PNEHello
from cpns.store.masterkey import write_private_file
from cpns.transport.stream import peer_text, read_message, write_message

__all__ = ["PAN_ADDRESS", "PANLink", "PANSide", "link_cap"]

log = logging.getLogger("cpns.gateway")

#: Destination a PNE uses in PNEHello: "whichever PN GW answers this link".
PAN_ADDRESS: Final = "pan"
#: File descriptors kept free of PAN links: control connections, the server link's lanes,
#: the store's files, logs.
_FD_RESERVE: Final = 64
#: The fewest PAN links a daemon accepts, whatever its descriptor limit.
_MIN_LINKS: Final = 16


def link_cap(configured: int) -> int:
    """``configured``, lowered so that PAN links can never use up the descriptors the
    control socket and the server link need (200 idle links once left the control socket
    unable to accept: issue 5 item 11)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - every Unix has it
        return configured
    if soft == resource.RLIM_INFINITY:
        return configured
    cap = max(_MIN_LINKS, int(soft) - _FD_RESERVE)
    if cap < configured:
        log.warning(
            "pan_max_links lowered from %d to %d: the descriptor limit is %d", configured, cap, soft
        )
        return cap
    return configured


class PANLink:
    """One PAN connection; ``pne_id`` is set by its PNEHello."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        write_timeout: float | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.pne_id: str | None = None
        self._write_timeout = write_timeout
        peer = writer.get_extra_info("peername")
        #: The peer's address (host only), for logs and the per-source cap.
        self.peer: str = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        self._send_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<PAN link {self.name}>"

    @property
    def name(self) -> str:
        """The PNE ID it announced (already checked by the codec), or ``?``."""
        return self.pne_id or "?"

    async def send(self, message: Message, *, level: int = logging.INFO) -> bool:
        """Write one message; False if the peer is gone, or does not read it within the
        write timeout (the link is then closed: a peer that stops reading must not hold
        our buffers). It carries the current flow ID unless it has one, and is logged
        (at ``level``: refusals of a peer's frames at DEBUG, D-PAN-4)."""
        message = stamp(message)
        log_hop(log, "sent", message, "pne", level=level)
        async with self._send_lock:
            try:
                await asyncio.wait_for(write_message(self.writer, message), self._write_timeout)
            except TimeoutError:
                self.writer.transport.abort()
                return False
            except (OSError, RuntimeError):
                return False
        return True

    def close(self) -> None:
        self.writer.close()


#: A procedure's handler of one message from an attached link; False closes the link.
type PANHandler = Callable[[PANLink, Message], Awaitable[bool]]
#: Called when a link announces a PNE (after the attach is recorded).
type AttachHandler = Callable[[PANLink, str], Awaitable[None]]


class PANSide:
    """The PAN listener, its links, the caps on them and the attached PNEs."""

    def __init__(self, config: GatewayConfig, connections: Connections) -> None:
        self._config = config
        self._connections = connections
        self._attach_listeners: list[AttachHandler] = []
        self._handlers: dict[type[Message], PANHandler] = {}
        self._server: asyncio.Server | None = None
        #: PNE ID -> its live PAN links, oldest first (several: a PNEHello proves nothing,
        #: so a new one never ends an existing link; bounded by pan_links_per_pne).
        self.routes: dict[str, list[PANLink]] = {}
        #: PNE ID -> flow ID (hex) of its latest PNEHello, while it is attached.
        self._hello_flows: dict[str, str] = {}
        #: Budget of log lines caused by PAN peers' faults.
        self._fault_log = LogBudget()
        #: Open PAN links per source address, and their total (the caps, issue 5 item 11).
        self._per_source: dict[str, int] = {}
        self._open_links = 0
        #: ``pan_max_links`` lowered to what the descriptor limit allows (set by start).
        self._max_links = config.pan_max_links

    def __repr__(self) -> str:
        return f"<PANSide {len(self.routes)} PNE(s) attached>"

    def subscribe(
        self,
        *,
        on_attach: AttachHandler | None = None,
        handlers: Mapping[type[Message], PANHandler] | None = None,
    ) -> None:
        """A procedure's part of the PAN side: ``on_attach`` hears of every attach (in
        the order procedures subscribed), ``handlers`` take the messages of their types
        from attached links (one procedure per message type)."""
        if on_attach is not None:
            self._attach_listeners.append(on_attach)
        for kind, handler in (handlers or {}).items():
            if kind is PNEHello or kind in self._handlers:
                raise ValueError(f"{kind.__name__} is already handled on the PAN")
            self._handlers[kind] = handler

    # -- what procedures ask of the PAN side ------------------------------------------------

    def links(self, pne_id: str) -> list[PANLink]:
        """The live links announcing ``pne_id`` (a copy), oldest first."""
        return list(self.routes.get(pne_id, ()))

    def hello_flow(self, pne_id: str) -> str | None:
        """The flow ID (hex) of the latest PNEHello of ``pne_id`` if it is attached."""
        return self._hello_flows.get(pne_id) if pne_id in self.routes else None

    def log_allowed(self) -> bool:
        """Whether a line caused by a PAN peer may be written now (the fault budget)."""
        allowed, _ = self._fault_log.take(asyncio.get_running_loop().time())
        return allowed

    async def refuse(self, link: Link, code: ErrorCode, txid: bytes = bytes(TXID_LEN)) -> None:
        """Answer a peer's frame with an ErrorMessage (logged at DEBUG, D-PAN-4)."""
        await link.send(
            ErrorMessage(
                txid=txid, src=self._config.entity_id, dst=link.pne_id or PAN_ADDRESS, status=code
            ),
            level=logging.DEBUG,
        )

    def peer_fault(self, link: Link, what: str, detail: str = "") -> None:
        """Log one bounded line about what a PAN peer did wrong (issue 5 items 10, 12).

        Peer-supplied text is cut and escaped (:func:`peer_text`), and these lines share a
        budget (:class:`LogBudget`): a peer flooding bad frames costs a few log lines,
        then one summary of how many were left out. Every fault is counted in
        ``cpns_gateway_pan_peer_faults``, the ones left out of the log too."""
        metrics.GATEWAY_PAN_FAULTS.inc()
        allowed, dropped = self._fault_log.take(asyncio.get_running_loop().time())
        if not allowed:
            return
        log.warning(
            "PAN %s (%s): %s%s%s",
            link.name,
            link.peer,
            what,
            f": {peer_text(detail)}" if detail else "",
            f" ({dropped} more PAN fault lines left out)" if dropped else "",
        )

    # -- the listener -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound PAN TCP port (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("the daemon is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def listening(self) -> bool:
        """Whether the listener is bound."""
        return self._server is not None

    async def start(self) -> None:
        """Bind the listener (ConfigurationError if the configured port cannot be bound)."""
        self._max_links = link_cap(self._config.pan_max_links)
        self._server = await self._bind()

    def close(self) -> None:
        """Stop accepting links."""
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        """Wait until the listener is closed."""
        if self._server is not None:
            await self._server.wait_closed()
        self._server = None

    def _remembered_port(self) -> int:
        """The port picked by an earlier start with ``pan_port = 0``; 0 if none (or bad)."""
        try:
            text = self._config.pan_port_memo.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return 0
        return int(text) if text.isdigit() and 1 <= int(text) <= 65535 else 0

    async def _bind(self) -> asyncio.Server:
        """Bind the PAN listener on the configured port, or for ``pan_port = 0`` on the
        port remembered from the first start (a free one then, remembered from now on), so
        that PNEs find a restarted gateway where they found it before.

        Raises ConfigurationError (the configured port cannot be bound)."""
        host, port = self._config.pan_host, self._config.pan_port
        if port == 0:
            remembered = self._remembered_port()
            if remembered:
                try:
                    return await self._start_server(host, remembered)
                except OSError as exc:
                    log.warning(
                        "PAN port %d (remembered) is not free (%s); picking another one: "
                        "PNEs configured with the old port must be told the new one",
                        remembered,
                        exc.strerror,
                    )
        try:
            server = await self._start_server(host, port)
        except OSError as exc:
            raise ConfigurationError(f"cannot listen on PAN {host}:{port}: {exc}") from None
        if port == 0:
            bound = int(server.sockets[0].getsockname()[1])
            try:
                write_private_file(
                    self._config.pan_port_memo, f"{bound}\n".encode(), overwrite=True
                )
            except OSError as exc:
                log.warning("cannot remember PAN port %d: %s", bound, exc.strerror)
        return server

    async def _start_server(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._handle, host, port)

    # -- links ----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        link = PANLink(reader, writer, write_timeout=self._config.pan_frame_timeout)
        if not self._admit(link):
            writer.transport.abort()  # refused cheaply: no read, no reply, no wait
            return
        self._connections.add(task, writer)
        try:
            while True:
                try:
                    message = await read_message(
                        reader,
                        idle_timeout=(
                            self._config.pan_hello_timeout
                            if link.pne_id is None
                            else self._config.pan_idle_timeout
                        ),
                        frame_timeout=self._config.pan_frame_timeout,
                    )
                except TimeoutError:
                    if link.pne_id is None:
                        self.peer_fault(link, "no PNEHello in time (pan_hello_timeout)")
                    else:  # the keep-alive ran out: the agent reconnects
                        log.info("PAN %s (%s): idle link closed", link.name, link.peer)
                    break
                except DecodeError as exc:
                    # Refused, logged in one bounded line; only this link ends.
                    self.peer_fault(link, "undecodable frame", exc.reason)
                    await self.refuse(link, exc.code)
                    break
                if message is None:
                    break
                try:
                    with message_scope(message):
                        keep = await self._on_message(link, message)
                except Exception as exc:  # one frame never takes the daemon down
                    self.peer_fault(link, f"{message.TYPE.name} not handled ({type(exc).__name__})")
                    log.debug("PAN %s: handler error", link.name, exc_info=True)
                    await self.refuse(link, ErrorCode.INTERNAL_ERROR, message.txid)
                    break
                if not keep:
                    break
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.info("PAN %s (%s): connection lost: %s", link.name, link.peer, exc)
        except Exception as exc:  # never let one connection take the daemon down
            self.peer_fault(link, f"link failed ({type(exc).__name__})")
            log.debug("PAN %s: link error", link.name, exc_info=True)
        finally:
            if link.pne_id is not None:
                self._detach(link)
            self._release(link)
            await self._connections.finish(task, writer)

    def _admit(self, link: PANLink) -> bool:
        """Count a new PAN link against the caps; False (logged within the fault budget)
        when the total or its source address is at its cap (issue 5 item 11)."""
        if self._open_links >= self._max_links:
            metrics.GATEWAY_PAN_REFUSED.labels("pan_max_links").inc()
            self.peer_fault(link, f"refused: {self._max_links} PAN links open (pan_max_links)")
            return False
        if self._per_source.get(link.peer, 0) >= self._config.pan_max_links_per_source:
            metrics.GATEWAY_PAN_REFUSED.labels("pan_max_links_per_source").inc()
            self.peer_fault(link, "refused: too many links from this address")
            return False
        metrics.GATEWAY_PAN_CONNECTIONS.inc()
        self._open_links += 1
        self._per_source[link.peer] = self._per_source.get(link.peer, 0) + 1
        return True

    def _release(self, link: PANLink) -> None:
        metrics.GATEWAY_PAN_CONNECTIONS.dec()
        self._open_links -= 1
        left = self._per_source.get(link.peer, 1) - 1
        if left > 0:
            self._per_source[link.peer] = left
        else:
            self._per_source.pop(link.peer, None)

    async def _on_message(self, link: PANLink, message: Message) -> bool:
        """Handle one message from a PAN link; False closes the link.

        The message's hop line (docs/logging.md) is written at INFO for what the gateway
        acts on (an accepted PNEHello; a procedure's handler logs the messages it takes),
        at DEBUG for what it refuses or ignores: those already cost a budgeted fault line,
        and no PAN peer may make the daemon write a line per frame (D-PAN-4)."""
        accepted = (
            link.pne_id is None
            and isinstance(message, PNEHello)
            and message.dst in (PAN_ADDRESS, self._config.entity_id)
            and len(self.routes.get(message.src, ())) < self._config.pan_links_per_pne
        )
        handler = self._handlers.get(type(message))
        if handler is None or link.pne_id is None:
            level = logging.INFO if accepted else logging.DEBUG
            log_hop(log, "received", message, "pne", level=level)
        if link.pne_id is None:
            if not isinstance(message, PNEHello):
                self.peer_fault(link, f"{message.TYPE.name} before PNEHello")
                await self.refuse(link, ErrorCode.UNEXPECTED_MESSAGE, message.txid)
                return False
            return await self._attach(link, message)
        if handler is not None:
            return await handler(link, message)
        self.peer_fault(link, f"unexpected {message.TYPE.name}")
        await self.refuse(link, ErrorCode.UNEXPECTED_MESSAGE, message.txid)
        return False

    async def _attach(self, link: PANLink, message: PNEHello) -> bool:
        if message.dst not in (PAN_ADDRESS, self._config.entity_id):
            self.peer_fault(link, "PNEHello for another gateway", message.dst)
            await self.refuse(link, ErrorCode.WRONG_DESTINATION, message.txid)
            return False
        links = self.routes.setdefault(message.src, [])
        if len(links) >= self._config.pan_links_per_pne:
            # D-PAN-1: a PNEHello proves nothing, so it never ends a live link; the
            # newcomer is refused instead (stale links go at the keep-alive).
            self.peer_fault(
                link, f"PNEHello refused: {len(links)} links already announce", message.src
            )
            await self.refuse(link, ErrorCode.NOT_AUTHORIZED, message.txid)
            return False
        link.pne_id = message.src
        if not links:
            metrics.GATEWAY_ATTACHED_PNES.inc()
        links.append(link)
        if message.flow is not None:
            self._hello_flows[message.src] = message.flow.hex()
        log.info(
            "PNE %s attached (holds key index %d; %d link(s))",
            message.src,
            message.key_index,
            len(links),
        )
        for listener in self._attach_listeners:
            await listener(link, message.src)
        return True

    def _detach(self, link: PANLink) -> None:
        pne_id = link.pne_id
        assert pne_id is not None
        links = self.routes.get(pne_id, [])
        if link in links:
            links.remove(link)
            log.info("PNE %s detached (%d link(s) left)", pne_id, len(links))
        if not links:
            self._hello_flows.pop(pne_id, None)
            if self.routes.pop(pne_id, None) is not None:
                metrics.GATEWAY_ATTACHED_PNES.dec()
