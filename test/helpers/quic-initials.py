#!/usr/bin/env python3
"""Half-open QUIC handshakes for the tests: starts COUNT QUIC connections (aioquic) to HOST:PORT
with SNI SERVER_NAME, each from its own UDP socket, sends each one's first flight (its Initial
packets, a real ClientHello) once, and then never answers: the server is left with COUNT
handshakes in progress until its handshake timeout. Keeps the sockets open for HOLD_MS, so the
server's answers find a port, then exits.

Usage: quic-initials.py HOST PORT SERVER_NAME COUNT HOLD_MS
Prints one JSON line once every first flight is sent: {"sent": COUNT, "datagrams": N}.
"""

from __future__ import annotations

import json
import socket
import sys
import time

from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection


def main() -> int:
    host, port, server_name, count, hold_ms = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    address = (host, port)
    sockets = []
    datagrams = 0
    for _ in range(count):
        configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=server_name, verify_mode=0)
        connection = QuicConnection(configuration=configuration)
        now = time.time()
        connection.connect(address, now=now)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        for data, to in connection.datagrams_to_send(now=now):
            udp.sendto(data, to)
            datagrams += 1
        sockets.append(udp)
    print(json.dumps({"sent": count, "datagrams": datagrams}), flush=True)
    time.sleep(hold_ms / 1000)
    for udp in sockets:
        udp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
