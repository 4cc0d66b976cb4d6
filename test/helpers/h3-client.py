#!/usr/bin/env python3
"""A real HTTP/3 client for the tests, on aioquic's asyncio API (QuicConnectionProtocol +
H3Connection, as in aioquic's examples/http3_client.py).

Reads one JSON document on stdin:
  { "host": "127.0.0.1", "port": 4433,
    "serverName": "a.test",          # SNI (optional; default: host)
    "caFile": "/path/ca.pem",        # trust only this CA (optional)
    "insecure": true,                # no verification at all (when no caFile)
    "alpn": ["h3"],                  # default ["h3"]
    "timeoutMs": 10000,              # for the whole run: handshake and every request
    "sequential": false,             # default: all requests at once on ONE QUIC connection
    "requests": [ { "method": "GET", "path": "/x",
                    "authority": "a.test",          # default: serverName, else host
                    "scheme": "https",              # default https
                    "headers": [["name", "value"], ...],
                    "body": "text" | null,
                    "bodySize": N,                  # N bytes of the pattern i % 251 instead
                    "omitContentLength": false,     # default: content-length is added with a body
                    "streams": K } ] }              # this request K times, concurrently

Writes one JSON document on stdout:
  { "ok": true, "alpn": "h3", "peerCertSha256": "<sha256 of the server's leaf certificate DER>",
    "responses": [ { "status": 200, "headers": [[name, value], ...], "bodyLength": N,
                     "bodySha256": "...", "bodyText": "<first 4096 bytes, utf-8, replaced>",
                     "sentLength": N, "sentSha256": "..." (when a body was sent),
                     "interim": [{"status": 103, "headers": [...]}] (1xx, when any),
                     "trailers": [[name, value], ...] (when any),
                     "stopSending": code (when the server sent STOP_SENDING) }
                   | { "reset": true, "errorCode": n, ...what arrived before the reset } ] }
  responses in request order, each request expanded by its "streams".
or, exit code 1:
  { "ok": false, "error": "...", "stage": "handshake" | "requests",
    "closeErrorCode": n, "closeFrameType": n | null, "closeReason": "...", "closedByPeer": bool,
    "tlsAlert": n (when the close carried a TLS alert) }
Exit code 2: the input could not be read.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import sys
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, ErrorCode as H3ErrorCode, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StopSendingReceived,
    StreamReset,
)
from aioquic.quic.packet import QuicErrorCode
from aioquic.tls import AlertDescription

BODY_TEXT_LIMIT = 4096
SEND_CHUNK = 64 * 1024
# How many bytes of a request body may wait unsent in aioquic's stream buffer before the sender
# waits for the peer (acknowledgements, flow-control credit) to make room.
SEND_BUFFER_LIMIT = 1024 * 1024
PATTERN = bytes(range(251))


def pattern_body(size: int) -> bytes:
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def decode_header(value: bytes) -> str:
    return value.decode("utf-8", errors="backslashreplace")


def describe_close(code: int, frame_type: int | None, reason: str) -> dict[str, Any]:
    """Names the error of a CONNECTION_CLOSE: a transport close (frame_type set) carries a QUIC
    error code, 0x100 + alert for a TLS alert; an application close (frame_type None) an HTTP/3
    code."""
    info: dict[str, Any] = {"closeErrorCode": code, "closeFrameType": frame_type, "closeReason": reason}
    name: str
    if frame_type is None:
        try:
            name = H3ErrorCode(code).name
        except ValueError:
            name = "application error"
    elif 0x100 <= code <= 0x1FF:
        alert = code - 0x100
        info["tlsAlert"] = alert
        try:
            name = f"TLS alert {alert} ({AlertDescription(alert).name})"
        except ValueError:
            name = f"TLS alert {alert}"
    else:
        try:
            name = QuicErrorCode(code).name
        except ValueError:
            name = "transport error"
    text = f"{name} (0x{code:x})"
    if reason:
        text += f": {reason}"
    info["closeText"] = text
    return info


class TrackingQuicConnection(QuicConnection):
    """Remembers whether the close came from the peer (a CONNECTION_CLOSE frame received)."""

    closed_by_peer = False

    def _handle_connection_close_frame(self, context: Any, frame_type: int, buf: Any) -> None:  # noqa: D401
        self.closed_by_peer = True
        super()._handle_connection_close_frame(context, frame_type, buf)


class Exchange:
    """One request on one stream and what came back."""

    def __init__(self, index: int, loop: asyncio.AbstractEventLoop) -> None:
        self.index = index
        self.stream_id: int | None = None
        self.done: asyncio.Future[None] = loop.create_future()
        self.status: int | None = None
        self.headers: list[list[str]] = []
        self.interim: list[dict[str, Any]] = []
        self.trailers: list[list[str]] | None = None
        self.body_hash = hashlib.sha256()
        self.body_length = 0
        self.body_head = bytearray()
        self.sent_length: int | None = None
        self.sent_sha256: str | None = None
        self.reset_code: int | None = None
        self.stop_sending_code: int | None = None
        self.send_error: str | None = None

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.reset_code is not None:
            out["reset"] = True
            out["errorCode"] = self.reset_code
        if self.status is not None or self.reset_code is None:
            out["status"] = self.status
            out["headers"] = self.headers
        out["bodyLength"] = self.body_length
        out["bodySha256"] = self.body_hash.hexdigest()
        out["bodyText"] = bytes(self.body_head).decode("utf-8", errors="replace")
        if self.sent_length is not None:
            out["sentLength"] = self.sent_length
            out["sentSha256"] = self.sent_sha256
        if self.interim:
            out["interim"] = self.interim
        if self.trailers is not None:
            out["trailers"] = self.trailers
        if self.stop_sending_code is not None:
            out["stopSending"] = self.stop_sending_code
        if self.send_error is not None:
            out["sendError"] = self.send_error
        return out


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.http = H3Connection(self._quic)
        self.exchanges: dict[int, Exchange] = {}
        self.alpn: str | None = None
        self.peer_cert_der: bytes | None = None
        self.terminated: ConnectionTerminated | None = None
        self.socket_error: OSError | None = None
        self.progress = asyncio.Event()
        self.closing = False  # set once this client closes the connection itself
        self.failed: asyncio.Future[str] = self._loop.create_future()

    # --- events -------------------------------------------------------------------------------

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self.alpn = event.alpn_protocol
            cert = getattr(self._quic.tls, "_peer_certificate", None)
            if cert is not None:
                from cryptography.hazmat.primitives.serialization import Encoding

                self.peer_cert_der = cert.public_bytes(Encoding.DER)
        elif isinstance(event, ConnectionTerminated):
            if not self.closing:
                self.terminated = event
                self._fail("connection closed")
        elif isinstance(event, StreamReset):
            exchange = self.exchanges.get(event.stream_id)
            if exchange is not None:
                exchange.reset_code = event.error_code
                exchange.finish()
        elif isinstance(event, StopSendingReceived):
            exchange = self.exchanges.get(event.stream_id)
            if exchange is not None:
                exchange.stop_sending_code = event.error_code
        for h3_event in self.http.handle_event(event):
            self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        stream_id = getattr(event, "stream_id", None)
        exchange = self.exchanges.get(stream_id) if stream_id is not None else None
        if exchange is None:
            return
        if isinstance(event, HeadersReceived):
            headers: list[list[str]] = []
            status: int | None = None
            for name, value in event.headers:
                if name == b":status":
                    try:
                        status = int(value)
                    except ValueError:
                        status = -1
                headers.append([decode_header(name), decode_header(value)])
            if exchange.status is None and status is not None and 100 <= status < 200:
                exchange.interim.append({"status": status, "headers": headers})
            elif exchange.status is None:
                exchange.status = status
                exchange.headers = headers
            else:
                exchange.trailers = headers
        elif isinstance(event, DataReceived):
            data = event.data
            exchange.body_hash.update(data)
            exchange.body_length += len(data)
            room = BODY_TEXT_LIMIT - len(exchange.body_head)
            if room > 0:
                exchange.body_head += data[:room]
        if getattr(event, "stream_ended", False):
            exchange.finish()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        self.progress.set()

    def error_received(self, exc: OSError) -> None:
        # The socket is connected, so an ICMP error (port unreachable: nothing listens) shows up.
        if self.socket_error is None:
            self.socket_error = exc
        self._fail("socket error")
        self.progress.set()

    def _fail(self, why: str) -> None:
        if not self.failed.done():
            self.failed.set_result(why)
        waiter = getattr(self, "_connected_waiter", None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError(why))
            self._connected_waiter = None
        self.progress.set()

    # --- requests -----------------------------------------------------------------------------

    def unsent_bytes(self, stream_id: int) -> int:
        """Bytes written to the stream that aioquic has not put on the wire yet (0 if unknown)."""
        stream = getattr(self._quic, "_streams", {}).get(stream_id)
        sender = getattr(stream, "sender", None)
        if sender is None:
            return 0
        try:
            return max(0, int(sender._buffer_stop) - int(sender.highest_offset))
        except (AttributeError, TypeError, ValueError):
            return 0

    async def run_request(self, exchange: Exchange, req: dict[str, Any], authority: str) -> None:
        try:
            await self._run_request(exchange, req, authority)
        except Exception as exc:  # e.g. a stream the server reset refuses further data
            if exchange.stop_sending_code is None:
                exchange.send_error = f"{type(exc).__name__}: {exc}"
            if exchange.stream_id is None:
                exchange.finish()

    async def _run_request(self, exchange: Exchange, req: dict[str, Any], authority: str) -> None:
        body: bytes | None = None
        if req.get("bodySize") is not None:
            body = pattern_body(int(req["bodySize"]))
        elif req.get("body") is not None:
            body = str(req["body"]).encode("utf-8")

        headers: list[tuple[bytes, bytes]] = [
            (b":method", str(req.get("method", "GET")).encode()),
            (b":scheme", str(req.get("scheme", "https")).encode()),
            (b":authority", str(req.get("authority") or authority).encode()),
            (b":path", str(req.get("path", "/")).encode()),
        ]
        extra = [(str(n).encode("utf-8"), str(v).encode("utf-8")) for n, v in req.get("headers") or []]
        headers += extra
        if body is not None and not req.get("omitContentLength") and not any(
            n.lower() == b"content-length" for n, _ in extra
        ):
            headers.append((b"content-length", str(len(body)).encode()))

        if body is not None:
            exchange.sent_length = len(body)
            exchange.sent_sha256 = hashlib.sha256(body).hexdigest()

        stream_id = self._quic.get_next_available_stream_id()
        self.http.send_headers(stream_id, headers, end_stream=body is None)
        exchange.stream_id = stream_id
        self.exchanges[stream_id] = exchange
        self.transmit()
        if body is None:
            return

        view = memoryview(body)
        offset = 0
        while True:
            if exchange.stop_sending_code is not None or self.failed.done():
                return
            chunk = bytes(view[offset:offset + SEND_CHUNK])
            offset += len(chunk)
            last = offset >= len(body)
            self.http.send_data(stream_id, chunk, end_stream=last)
            self.transmit()
            if last:
                return
            # Respect flow control: let aioquic put what it holds on the wire before adding more.
            while self.unsent_bytes(stream_id) > SEND_BUFFER_LIMIT:
                if exchange.stop_sending_code is not None or self.failed.done():
                    return
                self.progress.clear()
                await self.progress.wait()
            await asyncio.sleep(0)

    async def wait_exchange(self, exchange: Exchange) -> None:
        await asyncio.wait([exchange.done, self.failed], return_when=asyncio.FIRST_COMPLETED)


def fail(message: str, **extra: Any) -> None:
    out: dict[str, Any] = {"ok": False, "error": message}
    out.update(extra)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


async def run(spec: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    host = str(spec.get("host", "127.0.0.1"))
    port = int(spec["port"])
    server_name = spec.get("serverName")
    authority = str(spec.get("serverName") or host)

    config = QuicConfiguration(is_client=True, alpn_protocols=list(spec.get("alpn") or H3_ALPN))
    config.server_name = server_name or host
    if spec.get("caFile"):
        config.load_verify_locations(cafile=str(spec["caFile"]))
    elif spec.get("insecure"):
        config.verify_mode = ssl.CERT_NONE

    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, addr = infos[0]
    quic = TrackingQuicConnection(configuration=config)
    # A connected UDP socket: ICMP errors (nothing listening) reach error_received.
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: H3Client(quic), family=family, remote_addr=addr
    )
    client: H3Client = protocol  # type: ignore[assignment]
    state["client"] = client
    try:
        client.connect(addr)
        state["stage"] = "handshake"
        await client.wait_connected()
        state["stage"] = "requests"

        exchanges: list[Exchange] = []
        jobs: list[tuple[Exchange, dict[str, Any]]] = []
        for req in spec.get("requests") or []:
            for _ in range(max(1, int(req.get("streams") or 1))):
                exchange = Exchange(len(exchanges), loop)
                exchanges.append(exchange)
                jobs.append((exchange, req))
        state["exchanges"] = exchanges

        if spec.get("sequential"):
            for exchange, req in jobs:
                sender = asyncio.ensure_future(client.run_request(exchange, req, authority))
                await client.wait_exchange(exchange)
                if not sender.done():
                    sender.cancel()
                if client.failed.done():
                    break
        else:
            senders = [asyncio.ensure_future(client.run_request(e, r, authority)) for e, r in jobs]
            await asyncio.gather(*(client.wait_exchange(e) for e in exchanges))
            for s in senders:
                if not s.done():
                    s.cancel()

        if client.failed.done() and not all(e.done.done() for e in exchanges):
            raise ConnectionError("connection failed")

        return {
            "ok": True,
            "alpn": client.alpn,
            "peerCertSha256": hashlib.sha256(client.peer_cert_der).hexdigest() if client.peer_cert_der else None,
            "responses": [e.result() for e in exchanges],
        }
    finally:
        # Close at once: CONNECTION_CLOSE goes out now; the closing period is not waited for.
        client.closing = True
        waiter = getattr(client, "_connected_waiter", None)
        if waiter is not None and not waiter.done():
            waiter.cancel()  # nobody waits any more: no "exception never retrieved" at exit
            client._connected_waiter = None
        if client.terminated is None and client.socket_error is None:
            client.close()
        timer = getattr(client, "_timer", None)
        if timer is not None:
            timer.cancel()
            client._timer = None
        transport.close()


def failure_details(state: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    client: H3Client | None = state.get("client")
    extra: dict[str, Any] = {"stage": state.get("stage", "connect")}
    parts: list[str] = []
    if client is not None:
        if client.socket_error is not None:
            err = client.socket_error
            if isinstance(err, ConnectionRefusedError):
                parts.append("connection refused (ICMP port unreachable: nothing listens on that UDP port)")
            else:
                parts.append(f"socket error: {err}")
        if client.terminated is not None:
            t = client.terminated
            info = describe_close(t.error_code, t.frame_type, t.reason_phrase)
            by_peer = bool(getattr(client._quic, "closed_by_peer", False))
            info["closedByPeer"] = by_peer
            parts.append(("closed by the server: " if by_peer else "connection closed: ") + info.pop("closeText"))
            extra.update(info)
        if client.alpn is not None:
            extra["alpn"] = client.alpn
        if client.peer_cert_der is not None:
            extra["peerCertSha256"] = hashlib.sha256(client.peer_cert_der).hexdigest()
    exchanges: list[Exchange] = state.get("exchanges") or []
    if exchanges:
        extra["completed"] = sum(1 for e in exchanges if e.done.done())
        extra["requested"] = len(exchanges)
    return "; ".join(parts), extra


async def main_async(spec: dict[str, Any]) -> int:
    timeout_ms = int(spec.get("timeoutMs") or 10000)
    state: dict[str, Any] = {}
    try:
        result = await asyncio.wait_for(run(spec, state), timeout_ms / 1000)
    except asyncio.TimeoutError:
        detail, extra = failure_details(state)
        msg = f"timed out after {timeout_ms} ms in stage {extra['stage']}"
        if "completed" in extra:
            msg += f" ({extra['completed']} of {extra['requested']} responses complete)"
        if detail:
            msg += f"; {detail}"
        fail(msg, **extra)
        return 1
    except Exception as exc:  # handshake failure, connection error, bad address ...
        detail, extra = failure_details(state)
        fail(detail or f"{type(exc).__name__}: {exc}", **extra)
        return 1
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


def main() -> int:
    try:
        spec = json.loads(sys.stdin.read())
        if not isinstance(spec, dict) or "port" not in spec:
            raise ValueError("input must be a JSON object with at least 'port'")
    except Exception as exc:
        fail(f"bad input: {exc}")
        return 2
    return asyncio.run(main_async(spec))


if __name__ == "__main__":
    sys.exit(main())
