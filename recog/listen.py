"""The listening socket of recog's servers (recog.serve, recog.index serve-shard), bound before serving so that a
taken port is one sentence, and port 0 gets a free one (the servers log which)."""

from __future__ import annotations

import socket

from recog.errors import ConfigError


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is one sentence (and port 0 gets a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given: asyncio turns Nagle's algorithm off only on sockets that say TCP, and accepted connections
    # inherit this one's (with proto 0, every keep-alive answer waited ~40 ms for the client's delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or "
                          "--host.") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
