"""The PN GW's server link (cpns.gateway.upstream): HTTPS + Digest over real loopback TLS.

No mocked network: every test runs the real :class:`ServerClient` against a small HTTP/1.1
server on 127.0.0.1 (asyncio TLS streams, h11 framing, TLS 1.3 with a self-signed
certificate the client pins) that speaks the CPNS Server's contract with the real
:class:`DigestServer`, and can misbehave on cue: close a connection without answering or
in the middle of an answer, answer 5xx, answer too slowly, send an oversize body, close a
keep-alive connection. The real CPNS Server is exercised end to end in
tests/integration/.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
from tests.helpers import FIXED_NOW, SERVER_ID, FixedRandom
from tests.metrics import sample

from cpns.errors import ConfigurationError, ErrorCode, TransportError
from cpns.gateway.upstream import ServerClient, UpstreamAuthFailed, tls_context
from cpns.messages.codec import decode, encode
from cpns.messages.constants import MAX_MESSAGE_SIZE
from cpns.messages.model import (
    ErrorMessage,
    EUKeyAssignmentRequest,
    EUKeyAssignmentResponse,
    Message,
    UserKeyAssignmentRequest,
    UserKeyAssignmentResponse,
)
from cpns.protocol.digest import DigestServer, parse_digest
from cpns.server.tls import generate_self_signed
from cpns.types import EntityKind

_GW_KEY = bytes([0xA1]) * 32
WAIT = 20.0


def run[T](coro: Coroutine[Any, Any, T]) -> T:
    """Run one scenario on a fresh loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, WAIT))


def _request(txid: bytes = b"\x01" * 16) -> EUKeyAssignmentRequest:
    return EUKeyAssignmentRequest(
        txid=txid,
        src="gw-alice",
        dst=SERVER_ID,
        pne_id="pne-1",
        user_id="alice",
        time=FIXED_NOW,
        rand_pngw=b"\x02" * 32,
        auth_data=b"\x03" * 32,
        claim_proof=b"\x04" * 32,
    )


def _response(request: Message) -> EUKeyAssignmentResponse:
    return EUKeyAssignmentResponse(
        txid=request.txid,
        src=SERVER_ID,
        dst=request.src,
        status=ErrorCode.WRONG_PASSWORD,
        pne_id="pne-1",
    )


@dataclass
class Seen:
    """One request as the test server received it."""

    connection: int
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Answer:
    """What the test server does with one request."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    #: Close the connection right after this answer (``Connection: close`` is sent).
    close: bool = False
    #: Close the connection without answering at all.
    drop: bool = False
    #: Send the head and half the body, then close.
    partial: bool = False
    #: Seconds to wait before answering.
    delay: float = 0.0
    #: Bytes to send instead of an HTTP answer (then close).
    raw: bytes | None = None


Handler = Callable[[Seen], Awaitable[Answer]]


class DigestEndpoint:
    """The CPNS Server's contract on ``POST /cpns/v1/messages``, with the real
    DigestServer: 401 + challenge without credentials, 200 + rspauth with them."""

    def __init__(self, *, tamper_info: Callable[[str], str | None] | None = None) -> None:
        self.digest = DigestServer(realm="cpns", nonce_key=b"k" * 32)
        self.rng = FixedRandom(7)
        self.tamper_info = tamper_info
        self.always_401 = False

    async def __call__(self, seen: Seen) -> Answer:
        message = decode(seen.body)
        if isinstance(message, UserKeyAssignmentRequest):
            return Answer(body=encode(_response(message)))
        header = seen.headers.get("authorization")
        if header is None or self.always_401:
            values = self.digest.challenge(now=FIXED_NOW, rng=self.rng)
            return Answer(status=401, headers=[("www-authenticate", v) for v in values])
        ok = self.digest.verify(
            method="POST",
            uri=seen.target,
            authorization=header,
            lookup={"gw-alice": _GW_KEY.hex()}.get,
            now=FIXED_NOW,
        )
        info: str | None = ok.authentication_info
        if self.tamper_info is not None:
            info = self.tamper_info(ok.authentication_info)
        headers = [] if info is None else [("authentication-info", info)]
        return Answer(body=encode(_response(message)), headers=headers)


class LoopbackServer:
    """An HTTP/1.1 server over TLS on 127.0.0.1, one task per connection."""

    def __init__(self, cert: Path, key: Path, handler: Handler) -> None:
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(cert, key)
        self.handler = handler
        self.seen: list[Seen] = []
        self.connections = 0
        self._ids = itertools.count(1)
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> LoopbackServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    async def close_idle(self) -> None:
        """Close every open connection, as a server's keep-alive timeout does."""
        for writer in list(self._writers):
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.connections += 1
        number = next(self._ids)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                seen = await self._read(reader, conn, number)
                if seen is None:
                    return
                self.seen.append(seen)
                answer = await self.handler(seen)
                if answer.delay:
                    await asyncio.sleep(answer.delay)
                if answer.drop:
                    return
                if answer.raw is not None:
                    writer.write(answer.raw)
                    await writer.drain()
                    return
                headers = [("content-length", str(len(answer.body))), *answer.headers]
                if answer.close:
                    headers.append(("connection", "close"))
                head = conn.send(h11.Response(status_code=answer.status, headers=headers)) or b""
                if answer.partial:
                    writer.write(head + answer.body[: len(answer.body) // 2])
                    await writer.drain()
                    return
                body = conn.send(h11.Data(data=answer.body)) or b"" if answer.body else b""
                writer.write(head + body + (conn.send(h11.EndOfMessage()) or b""))
                await writer.drain()
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (OSError, ssl.SSLError, h11.ProtocolError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _read(
        self, reader: asyncio.StreamReader, conn: h11.Connection, number: int
    ) -> Seen | None:
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return Seen(
                    connection=number,
                    method=request.method.decode(),
                    target=request.target.decode(),
                    headers={k.decode(): v.decode() for k, v in request.headers},
                    body=body,
                )
            else:  # ConnectionClosed
                return None


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost (what ``cpns server init`` makes)."""
    base = tmp_path_factory.mktemp("tls")
    generate_self_signed(base / "cert.pem", base / "key.pem", common_name="cpns-server")
    return base / "cert.pem", base / "key.pem"


def _client(server: LoopbackServer, cert: Path, **kw: Any) -> ServerClient:
    options: dict[str, Any] = {"backoff": 0, "eukey": _GW_KEY, **kw}
    return ServerClient(
        server_url=server.url, ca_file=cert, entity_id="gw-alice", rng=FixedRandom(3), **options
    )


async def _exchange_all(client: ServerClient, messages: list[Message]) -> list[Message]:
    try:
        return [await client.exchange(m) for m in messages]
    finally:
        await client.aclose()


def _scenario(
    tls_files: tuple[Path, Path],
    handler: Handler,
    messages: list[Message],
    **kw: Any,
) -> tuple[list[Message], LoopbackServer]:
    cert, key = tls_files

    async def go() -> tuple[list[Message], LoopbackServer]:
        async with LoopbackServer(cert, key, handler) as server:
            replies = await _exchange_all(_client(server, cert, **kw), messages)
        return replies, server

    return run(go())


def _failing(
    tls_files: tuple[Path, Path], handler: Handler, **kw: Any
) -> tuple[BaseException, LoopbackServer]:
    cert, key = tls_files

    async def go() -> tuple[BaseException, LoopbackServer]:
        async with LoopbackServer(cert, key, handler) as server:
            try:
                await _exchange_all(_client(server, cert, **kw), [_request()])
            except (TransportError, UpstreamAuthFailed) as exc:
                return exc, server
        raise AssertionError("the exchange succeeded")

    return run(go())


def test_server_client_answers_the_digest_challenge_and_reuses_the_nonce(
    tls_files: tuple[Path, Path],
) -> None:
    """004 §5.x.2: first request without credentials, 401, retry with Digest; the next
    request reuses the nonce (one round trip) on the same keep-alive TLS connection; the
    server's rspauth is verified."""
    endpoint = DigestEndpoint()
    first, second = _request(b"\x01" * 16), _request(b"\x02" * 16)
    replies, server = _scenario(tls_files, endpoint, [first, second])
    assert replies == [_response(first), _response(second)]
    sent = server.seen
    assert len(sent) == 3
    assert "authorization" not in sent[0].headers
    assert "nc=00000001" in sent[1].headers["authorization"]
    assert "nc=00000002" in sent[2].headers["authorization"]
    assert [r.body for r in sent] == [encode(first), encode(first), encode(second)]
    assert {(r.method, r.target) for r in sent} == {("POST", "/cpns/v1/messages")}
    assert sent[0].headers["content-type"] == "application/cbor"
    assert sent[0].headers["host"] == f"localhost:{server.port}"
    assert server.connections == 1


def test_enrolment_request_needs_no_digest(tls_files: tuple[Path, Path]) -> None:
    """004 §5.x.1: the with-UI request carries its own proof and is sent without Digest."""
    message = UserKeyAssignmentRequest(
        txid=b"\x04" * 16,
        src="gw-alice",
        dst=SERVER_ID,
        user_id="alice",
        entity_kind=EntityKind.PN_GW,
        time=FIXED_NOW,
        rand=b"\x05" * 32,
        auth_data=b"\x06" * 32,
    )
    (reply,), server = _scenario(tls_files, DigestEndpoint(), [message], eukey=None)
    assert reply.txid == message.txid
    assert [("authorization" in r.headers) for r in server.seen] == [False]


class RelayEndpoint(DigestEndpoint):
    """The real server's rule for the open type: an empty POST without credentials is
    challenged; a with-UI request is served with or without Digest (with it, the
    authenticated PN GW relayed it)."""

    async def __call__(self, seen: Seen) -> Answer:
        header = seen.headers.get("authorization")
        if not seen.body and header is None:
            values = self.digest.challenge(now=FIXED_NOW, rng=self.rng)
            return Answer(status=401, headers=[("www-authenticate", v) for v in values])
        message = decode(seen.body)
        reply = UserKeyAssignmentResponse(
            txid=message.txid, src=SERVER_ID, dst=message.src, status=ErrorCode.WRONG_PASSWORD
        )
        if header is None:
            return Answer(body=encode(reply))
        ok = self.digest.verify(
            method="POST",
            uri=seen.target,
            authorization=header,
            lookup={"gw-alice": _GW_KEY.hex()}.get,
            now=FIXED_NOW,
        )
        return Answer(body=encode(reply), headers=[("authentication-info", ok.authentication_info)])


def _pne_enrolment(txid: bytes) -> UserKeyAssignmentRequest:
    return UserKeyAssignmentRequest(
        txid=txid,
        src="pne-ui",
        dst=SERVER_ID,
        user_id="alice",
        entity_kind=EntityKind.PNE,
        time=FIXED_NOW,
        rand=b"\x05" * 32,
        auth_data=b"\x06" * 32,
    )


def test_a_relayed_enrolment_request_carries_digest(tls_files: tuple[Path, Path]) -> None:
    """Our rule (docs/procedures/pne-enrolment.md): an enrolled PN GW relays a PNE's
    with-UI request authenticated as itself, so the server knows which PN GW relayed it.
    The server would serve the open type without credentials, so a lane without a nonce
    first fetches the challenge with an empty POST; the next relay reuses the nonce."""
    first, second = _pne_enrolment(b"\x07" * 16), _pne_enrolment(b"\x08" * 16)
    replies, server = _scenario(tls_files, RelayEndpoint(), [first, second])
    assert [r.txid for r in replies] == [first.txid, second.txid]
    sent = server.seen
    assert [r.body for r in sent] == [b"", encode(first), encode(second)]
    assert "authorization" not in sent[0].headers
    assert "nc=00000001" in sent[1].headers["authorization"]
    assert "nc=00000002" in sent[2].headers["authorization"]


@pytest.mark.parametrize(
    "tamper",
    [lambda info: None, lambda info: info.replace('rspauth="', 'rspauth="0')],
    ids=["missing", "wrong"],
)
def test_reply_without_a_valid_rspauth_is_rejected(
    tls_files: tuple[Path, Path], tamper: Callable[[str], str | None]
) -> None:
    """DESIGN §5 / 004 §5.x.2: a reply the server did not authenticate is rejected."""
    error, _ = _failing(tls_files, DigestEndpoint(tamper_info=tamper))
    assert isinstance(error, UpstreamAuthFailed)
    assert error.hop == "gateway"


def test_second_401_means_the_server_refuses_our_key(tls_files: tuple[Path, Path]) -> None:
    """A 401 to a request that answered the challenge: our EUKey is not accepted."""
    endpoint = DigestEndpoint()
    endpoint.always_401 = True
    error, server = _failing(tls_files, endpoint)
    assert isinstance(error, UpstreamAuthFailed)
    assert error.hop == "server"
    assert len(server.seen) == 2


def test_connections_closed_without_an_answer_are_retried_with_identical_bytes_then_fail(
    tls_files: tuple[Path, Path],
) -> None:
    """DESIGN §5: bounded retries resend the same body, each on a new connection; then a
    TransportError names the gateway->server hop and what went wrong."""

    async def drop(seen: Seen) -> Answer:
        return Answer(drop=True)

    before = sample("cpns_gateway_upstream_retries_total")
    error, server = _failing(tls_files, drop, retries=2)
    assert isinstance(error, TransportError)
    assert "gateway->server" in str(error)
    assert "connection" in str(error)
    assert [r.body for r in server.seen] == [encode(_request())] * 3
    assert server.connections == 3
    assert sample("cpns_gateway_upstream_retries_total") == before + 2


def test_a_server_that_is_not_listening_is_a_clear_transport_error(
    tls_files: tuple[Path, Path],
) -> None:
    """No server on the port: after the retries, a TransportError that says so."""
    cert, _ = tls_files

    async def go() -> TransportError:
        with contextlib.closing(__import__("socket").socket()) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, never listening: connections are refused
            client = ServerClient(
                server_url=f"https://localhost:{port}",
                ca_file=cert,
                entity_id="gw-alice",
                eukey=_GW_KEY,
                backoff=0,
                retries=1,
            )
            with pytest.raises(TransportError) as info:
                await _exchange_all(client, [_request()])
        return info.value

    error = run(go())
    assert "CPNS Server unreachable" in str(error)
    assert "refused" in str(error)


def test_a_slow_answer_beyond_the_per_try_timeout_is_retried(
    tls_files: tuple[Path, Path],
) -> None:
    """Each try has its own timeout: a try the server leaves unanswered past it is
    abandoned and retried (on a new connection); the server's stored reply comes back."""
    endpoint = DigestEndpoint()
    calls = {"n": 0}

    async def slow_once(seen: Seen) -> Answer:
        calls["n"] += 1
        answer = await endpoint(seen)
        if calls["n"] == 2:
            answer.delay = 60.0  # far beyond the timeout: the client gives up first
        return answer

    (reply,), server = _scenario(tls_files, slow_once, [_request()], per_try_timeout=0.5)
    assert reply == _response(_request())
    assert calls["n"] == 3
    assert server.connections == 2


def test_a_connection_closed_in_the_middle_of_the_answer_is_retried(
    tls_files: tuple[Path, Path],
) -> None:
    """An answer cut short (half the body, then the connection closes) is a failed try,
    retried with the same body; the complete answer is returned."""
    endpoint = DigestEndpoint()
    calls = {"n": 0}

    async def cut_once(seen: Seen) -> Answer:
        calls["n"] += 1
        answer = await endpoint(seen)
        answer.partial = calls["n"] == 2
        return answer

    (reply,), server = _scenario(tls_files, cut_once, [_request()])
    assert reply == _response(_request())
    assert server.seen[1].body == server.seen[2].body == encode(_request())


def test_a_5xx_then_success_returns_the_reply(tls_files: tuple[Path, Path]) -> None:
    """DESIGN §5: a 5xx is retried (counted in cpns_gateway_upstream_retries_total);
    the keep-alive connection stays in use."""
    endpoint = DigestEndpoint()
    calls = {"n": 0}

    async def busy_once(seen: Seen) -> Answer:
        calls["n"] += 1
        if calls["n"] == 1:
            return Answer(status=503)
        return await endpoint(seen)

    before = sample("cpns_gateway_upstream_retries_total")
    (reply,), server = _scenario(tls_files, busy_once, [_request()])
    assert reply == _response(_request())
    assert sample("cpns_gateway_upstream_retries_total") == before + 1
    assert server.connections == 1


def test_an_oversize_reply_is_refused_without_retrying(tls_files: tuple[Path, Path]) -> None:
    """A reply body larger than the largest CPNS message is outside the contract: a
    TransportError at once, not a retry."""

    async def huge(seen: Seen) -> Answer:
        return Answer(body=b"\x00" * (MAX_MESSAGE_SIZE + 1))

    error, server = _failing(tls_files, huge, retries=2)
    assert isinstance(error, TransportError)
    assert f"{MAX_MESSAGE_SIZE}-byte limit" in str(error)
    assert len(server.seen) == 1


def test_an_answer_that_is_not_http_is_a_clear_transport_error(
    tls_files: tuple[Path, Path],
) -> None:
    """Bytes that are not an HTTP/1.1 answer: each try fails, and the TransportError says
    the server's HTTP was malformed."""

    async def garbage(seen: Seen) -> Answer:
        return Answer(raw=b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    error, server = _failing(tls_files, garbage, retries=1)
    assert isinstance(error, TransportError)
    assert "malformed HTTP from the server" in str(error)
    assert len(server.seen) == 2


def test_a_keep_alive_connection_the_server_closed_is_replaced_without_a_retry(
    tls_files: tuple[Path, Path],
) -> None:
    """A keep-alive connection the server closes between two requests (its idle timeout)
    is replaced by a new one; the request goes through and no retry is counted."""
    cert, key = tls_files
    endpoint = DigestEndpoint()

    async def go() -> tuple[list[Message], int, float]:
        async with LoopbackServer(cert, key, endpoint) as server:
            client = _client(server, cert)
            before = sample("cpns_gateway_upstream_retries_total")
            try:
                first = await client.exchange(_request(b"\x01" * 16))
                await server.close_idle()
                second = await client.exchange(_request(b"\x02" * 16))
            finally:
                await client.aclose()
            retries = sample("cpns_gateway_upstream_retries_total") - before
            return [first, second], server.connections, retries

    replies, connections, retries = run(go())
    assert replies == [_response(_request(b"\x01" * 16)), _response(_request(b"\x02" * 16))]
    assert (connections, retries) == (2, 0)


def test_a_request_meeting_a_just_closed_keep_alive_connection_goes_again_at_once(
    tls_files: tuple[Path, Path],
) -> None:
    """The race the idle check cannot see: the server closes a reused connection as the
    request arrives, without answering. The request goes again on a new connection at
    once (with a fresh Digest nc), and no retry is counted."""
    endpoint = DigestEndpoint()

    async def close_second_on_first_connection(seen: Seen) -> Answer:
        if seen.connection == 1 and len([s for s in server_seen() if s.connection == 1]) == 3:
            return Answer(drop=True)
        return await endpoint(seen)

    holder: dict[str, LoopbackServer] = {}

    def server_seen() -> list[Seen]:
        return holder["server"].seen

    cert, key = tls_files

    async def go() -> tuple[list[Message], float]:
        async with LoopbackServer(cert, key, close_second_on_first_connection) as server:
            holder["server"] = server
            client = _client(server, cert)
            before = sample("cpns_gateway_upstream_retries_total")
            replies = await _exchange_all(client, [_request(b"\x01" * 16), _request(b"\x02" * 16)])
            return replies, sample("cpns_gateway_upstream_retries_total") - before

    replies, retries = run(go())
    assert replies == [_response(_request(b"\x01" * 16)), _response(_request(b"\x02" * 16))]
    assert retries == 0
    seen = holder["server"].seen
    assert [s.connection for s in seen] == [1, 1, 1, 2]
    assert "nc=00000003" in seen[3].headers["authorization"]


def test_connection_close_from_the_server_opens_a_new_connection(
    tls_files: tuple[Path, Path],
) -> None:
    """An answer with ``Connection: close`` ends that connection; the next request opens a
    new one."""
    endpoint = DigestEndpoint()

    async def closing(seen: Seen) -> Answer:
        answer = await endpoint(seen)
        answer.close = True
        return answer

    replies, server = _scenario(tls_files, closing, [_request(b"\x01" * 16), _request()])
    assert len(replies) == 2
    assert server.connections == 3


def test_http_400_returns_the_servers_error_message(tls_files: tuple[Path, Path]) -> None:
    """The server answers undecodable input with 400 and an ErrorMessage: relayed."""
    error = ErrorMessage(
        txid=bytes(16), src=SERVER_ID, dst="gw-alice", status=ErrorCode.MALFORMED_MESSAGE
    )

    async def bad(seen: Seen) -> Answer:
        return Answer(status=400, body=encode(error))

    (reply,), _ = _scenario(tls_files, bad, [_request()])
    assert reply == error


def test_a_reply_that_is_not_a_cpns_message_is_a_transport_error(
    tls_files: tuple[Path, Path],
) -> None:
    """A 400 without an ErrorMessage, or an unexpected status, is outside the contract."""

    async def teapot(seen: Seen) -> Answer:
        return Answer(status=418)

    error, _ = _failing(tls_files, teapot)
    assert isinstance(error, TransportError)
    assert "unexpected HTTP 418" in str(error)


def test_a_server_certificate_other_than_the_pinned_one_is_refused(
    tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """DESIGN §2: the client trusts exactly the configured certificate; a server with
    another (even for the right name) is refused with a TransportError saying so."""
    cert, key = tls_files
    other = tmp_path / "other.pem"
    generate_self_signed(other, tmp_path / "other-key.pem", common_name="cpns-server")

    async def go() -> TransportError:
        async with LoopbackServer(cert, key, DigestEndpoint()) as server:
            client = _client(server, other, retries=0)
            with pytest.raises(TransportError) as info:
                await _exchange_all(client, [_request()])
            assert server.seen == []
        return info.value

    assert "certificate" in str(run(go()))


def test_healthz_answers_whether_the_server_is_up(tls_files: tuple[Path, Path]) -> None:
    """``healthz``: True on a 200 from GET /healthz, False when nothing answers."""
    cert, key = tls_files

    async def ok(seen: Seen) -> Answer:
        return Answer(status=200 if seen.target == "/healthz" else 404, body=b"ok\n")

    async def go() -> tuple[bool, bool]:
        async with LoopbackServer(cert, key, ok) as server:
            client = _client(server, cert)
            up = await client.healthz()
            await client.aclose()
        return up, await client.healthz()

    assert run(go()) == (True, False)


def test_tls_context_is_tls13_and_trusts_only_the_given_certificate(tmp_path: Path) -> None:
    """DESIGN §2: TLS 1.3 with the server's certificate; a missing file is a
    ConfigurationError (exit 2), not a fallback to the system store."""
    cert = tmp_path / "cert.pem"
    generate_self_signed(cert, tmp_path / "key.pem", common_name="cpns-server")
    ctx = tls_context(cert)
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert len(ctx.get_ca_certs()) == 1
    with pytest.raises(ConfigurationError, match="cannot load the server certificate"):
        tls_context(tmp_path / "missing.pem")


def test_concurrent_exchanges_use_one_nonce_and_one_connection_per_lane(
    tls_files: tuple[Path, Path],
) -> None:
    """DESIGN §8 with RFC 7616 §3.4/§5.4: up to ``lanes`` exchanges run at once, each lane
    with its own nonce and keep-alive connection, so every nonce's nc reaches the
    (strict, nc_window=1) real DigestServer in increasing order even when replies come
    back out of order; each lane costs one 401, and every reply is verified and matched
    to its request."""
    endpoint = DigestEndpoint()
    count = {"n": 0}

    async def slow_handler(seen: Seen) -> Answer:
        # Later requests come back first: the lanes overlap for real.
        count["n"] += 1
        answer = await endpoint(seen)
        answer.delay = 0.001 * (20 - count["n"] % 20)
        return answer

    messages: list[Message] = [_request(bytes([i + 1]) * 16) for i in range(12)]
    cert, key = tls_files

    async def go() -> tuple[list[Message], LoopbackServer]:
        async with LoopbackServer(cert, key, slow_handler) as server:
            client = _client(server, cert, lanes=3)
            try:
                replies = list(await asyncio.gather(*(client.exchange(m) for m in messages)))
            finally:
                await client.aclose()
        return replies, server

    replies, server = run(go())
    assert replies == [_response(m) for m in messages]
    assert server.connections == 3
    unauthenticated = [r for r in server.seen if "authorization" not in r.headers]
    assert len(unauthenticated) == 3
    counts: dict[str, list[int]] = {}
    for r in server.seen:
        header = r.headers.get("authorization")
        if header is not None:
            params = parse_digest(header)
            counts.setdefault(params["nonce"], []).append(int(params["nc"], 16))
    assert len(counts) == 3
    for seen in counts.values():
        assert seen == list(range(1, len(seen) + 1))


def test_constructor_refuses_what_cannot_work(tls_files: tuple[Path, Path]) -> None:
    """Bad settings are a ValueError at construction, not a failure at the first send."""
    cert, _ = tls_files
    for kw in (
        {"server_url": "http://localhost:1", "ca_file": cert},
        {"server_url": "https://localhost:1", "ca_file": None},
        {"server_url": "https://localhost:1", "ca_file": cert, "lanes": 0},
    ):
        with pytest.raises(ValueError, match=r"."):
            ServerClient(entity_id="gw-alice", eukey=_GW_KEY, **kw)  # type: ignore[arg-type]
