"""A pausable TCP proxy on 127.0.0.1, for outage tests against a real server.

``pause()`` resets every open connection and, until ``resume()``, resets each new one as soon
as it is accepted, so clients see what a crashed server gives them (connection reset). The
listening socket stays bound, so the port cannot be taken by another process meanwhile. The
server behind it keeps its state, as a restarted object store does.
"""

from __future__ import annotations

import socket
import struct
import threading


class TcpProxy:
    def __init__(self, listen_port: int, target_port: int, host: str = "127.0.0.1"):
        self.host, self.listen_port, self.target_port = host, listen_port, target_port
        self._lsock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.paused = False

    def start(self) -> "TcpProxy":
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.listen_port))
        s.listen(128)
        self._lsock = s
        self.paused = False
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        return self

    def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                client, _ = lsock.accept()
            except OSError:
                return  # listening socket closed: stopped
            if self.paused:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection((self.host, self.target_port), timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)

    def pause(self) -> None:
        self.paused = True
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _reset(c)

    def resume(self) -> None:
        self.paused = False

    def stop(self) -> None:
        self.pause()
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets an RST, as from a crashed server."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
