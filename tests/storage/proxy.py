"""A TCP relay that counts the bytes a server sends, to measure what a client fetched.

Put between a store (or a whole node) and the S3 server, :class:`CountingRelay` tells
how many bytes the server really sent on the wire: HTTP headers and bodies of every
answer, whatever the client then did with them.  It forwards bytes unchanged, so the
client and the server speak to each other as they would directly (SigV4 signs the
``Host`` the client sends, which the server checks as received).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

#: How every HTTP/1.1 request line ends (RFC 9112 3).
_REQUEST_LINE_END = b" HTTP/1.1\r\n"


class CountingRelay:
    """Relays loopback connections on a free port to ``upstream`` (``host:port``).

    :attr:`received` is the number of bytes the server sent to clients so far,
    :attr:`requests` the number of HTTP requests clients sent (their request lines; a
    request body that looks like one would count too, so count during reads only),
    :attr:`connections` the number of connections relayed.
    """

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.received = 0
        self.requests = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> CountingRelay:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def reset(self) -> None:
        """Start counting from zero."""
        with self._lock:
            self.received = 0
            self.requests = 0
            self.connections = 0

    def close(self) -> None:
        """Stop listening and drop every relayed connection."""
        self._closed = True
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                # Shut down first: close() alone does not wake a pump blocked in recv()
                # on the socket, whose kernel socket then stays open without a FIN.  A
                # client waiting for an answer on it (a node's request in flight) would
                # hang until its read timeout, and hold up its own shutdown as long.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            # Forwarded as it comes: Nagle's algorithm would hold a small answer
            # back until the client's delayed ACK (40 ms a request).
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True),
                             daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, answers: bool) -> None:
        """Copy ``source`` to ``target``: the server's answers when ``answers``, else
        the client's requests."""
        tail = b""  # the end of the previous chunk: a request line may span two
        try:
            while data := source.recv(1 << 16):
                with self._lock:
                    if answers:
                        self.received += len(data)
                    else:
                        # The tail is too short to hold a whole line end: none counts twice.
                        seen = tail + data
                        self.requests += seen.count(_REQUEST_LINE_END)
                        tail = seen[-len(_REQUEST_LINE_END) + 1:]
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
