#!/usr/bin/env python3
"""A real HTTP/3 server for the tests, on aioquic's asyncio API (serve + QuicConnectionProtocol +
H3Connection, as in aioquic's examples/http3_server.py). test/helpers/h3.ts startH3Server runs it.

  h3-server.py --cert CERT.pem --key KEY.pem --tag TAG [--host 127.0.0.1] [--port 0]

Binds UDP on host:port (0: a free port), ALPN h3, and prints ONE line on stdout when it is ready:
  {"port": N}
Nothing else goes to stdout; the log (each ClientHello's SNI, each connection and request) goes to
stderr. Serves until
SIGTERM or SIGINT, or until stdin reaches its end (when stdin is a pipe), then exits 0.

Answers every request with 200:
  POST, PUT: the request body echoed (content-type the request's, else application/octet-stream),
             with x-received-length and x-received-sha256;
  HEAD:      the headers a GET would get, no body;
  others:    text/plain; charset=utf-8, body "<TAG> <:authority> <:path>".
Every response carries x-h3-tag (TAG), x-h3-connection (this connection's number, from 1) and
x-h3-connections (connections accepted so far), so a test can tell which server and connection
answered.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
from dataclasses import dataclass, field

import aioquic.tls as tls
from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.buffer import Buffer
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, ProtocolNegotiated, QuicEvent, StreamReset


def log(message: str) -> None:
    print(f"h3-server: {message}", file=sys.stderr, flush=True)


# aioquic's server keeps no SNI: log it from each ClientHello as it is parsed (for the log only).
_pull_client_hello = tls.pull_client_hello


def _logging_pull_client_hello(buf: Buffer) -> tls.ClientHello:
    hello = _pull_client_hello(buf)
    log(f"client hello: sni={hello.server_name!r} alpn={hello.alpn_protocols!r}")
    return hello


tls.pull_client_hello = _logging_pull_client_hello


@dataclass
class Request:
    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class Counters:
    connections = 0


class H3TestServer(QuicConnectionProtocol):
    tag = ""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        Counters.connections += 1
        self.number = Counters.connections
        self.http: H3Connection | None = None
        self.requests: dict[int, Request] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated):
            if event.alpn_protocol in H3_ALPN:
                self.http = H3Connection(self._quic)
        elif isinstance(event, HandshakeCompleted):
            log(f"connection {self.number} up: alpn={event.alpn_protocol!r}")
        elif isinstance(event, ConnectionTerminated):
            log(f"connection {self.number} closed: code={event.error_code} reason={event.reason_phrase!r}")
        elif isinstance(event, StreamReset):
            self.requests.pop(event.stream_id, None)
        if self.http is not None:
            for h3_event in self.http.handle_event(event):
                self.h3_event_received(h3_event)

    def h3_event_received(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            request = self.requests.get(event.stream_id)
            if request is None:
                self.requests[event.stream_id] = Request(headers=list(event.headers))
            # A second HEADERS frame on the stream is trailers: ignored.
            if event.stream_ended:
                self.respond(event.stream_id)
        elif isinstance(event, DataReceived):
            request = self.requests.get(event.stream_id)
            if request is None:
                return
            request.body += event.data
            if event.stream_ended:
                self.respond(event.stream_id)

    def respond(self, stream_id: int) -> None:
        request = self.requests.pop(stream_id, None)
        if request is None or self.http is None:
            return
        method = (request.header(b":method") or b"GET").decode("latin-1")
        authority = (request.header(b":authority") or request.header(b"host") or b"-").decode("utf-8", errors="replace")
        path = (request.header(b":path") or b"/").decode("utf-8", errors="replace")
        extra: list[tuple[bytes, bytes]] = []
        if method in ("POST", "PUT"):
            body = bytes(request.body)
            content_type = request.header(b"content-type") or b"application/octet-stream"
            extra = [
                (b"x-received-length", str(len(body)).encode()),
                (b"x-received-sha256", hashlib.sha256(body).hexdigest().encode()),
            ]
        else:
            body = f"{self.tag} {authority} {path}".encode()
            content_type = b"text/plain; charset=utf-8"
        log(f"connection {self.number} stream {stream_id}: {method} {authority} {path} -> 200 ({len(body)} bytes)")
        headers = [
            (b":status", b"200"),
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"x-h3-tag", self.tag.encode()),
            (b"x-h3-connection", str(self.number).encode()),
            (b"x-h3-connections", str(Counters.connections).encode()),
            *extra,
        ]
        if method == "HEAD":
            self.http.send_headers(stream_id, headers, end_stream=True)
        else:
            self.http.send_headers(stream_id, headers)
            self.http.send_data(stream_id, body, end_stream=True)
        self.transmit()


async def main(args: argparse.Namespace) -> int:
    H3TestServer.tag = args.tag
    configuration = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536)
    configuration.load_cert_chain(args.cert, args.key)
    server = await serve(args.host, args.port, configuration=configuration, create_protocol=H3TestServer)
    transport = server._transport  # aioquic keeps the UDP transport here; serve() does not return it
    if transport is None:
        log("no transport after serve()")
        return 1
    port = transport.get_extra_info("sockname")[1]

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_stdin() -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            stop.set()

    try:
        loop.add_reader(0, on_stdin)
    except (OSError, ValueError):
        pass  # stdin is a file, /dev/null or closed: only a signal stops the server

    print(json.dumps({"port": port}), flush=True)
    log(f"tag {args.tag!r} listening on udp {args.host}:{port}")
    await stop.wait()
    log(f"stopping after {Counters.connections} connection(s)")
    server.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="HTTP/3 test server (aioquic)")
    parser.add_argument("--cert", required=True, help="PEM certificate chain")
    parser.add_argument("--key", required=True, help="PEM private key")
    parser.add_argument("--tag", required=True, help="first word of every GET response body")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    sys.exit(asyncio.run(main(parser.parse_args())))
