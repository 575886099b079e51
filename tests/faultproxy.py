"""A test fixture: a TCP proxy on loopback that forwards, or hangs.

In front of the ClickHouse HTTP front end it makes the store hang for real:
in "hang" mode it accepts connections (and keeps those already open) but
never passes a byte on or back, so the client waits until its own timeout.
Back in "pass" mode new connections are forwarded again.
"""

from __future__ import annotations

import socket
import threading


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.accepted = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._stopped = threading.Event()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def hang(self) -> None:
        self.mode = "hang"

    def heal(self) -> None:
        self.mode = "pass"
        for conn in self._held:  # what hung stays hung for the client: close it, as a real outage ends
            _close(conn)
        self._held.clear()

    def stop(self) -> None:
        self._stopped.set()
        _close(self._server)
        for conn in self._held:
            _close(conn)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == "hang":
                self._held.append(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                if self.mode == "hang":  # stop passing bytes on; hold both ends open
                    self._held += [src, dst]
                    return
                data = src.recv(65536)
                if not data:
                    break
                if self.mode == "hang":
                    self._held += [src, dst]
                    return
                dst.sendall(data)
        except OSError:
            pass
        _close(src)
        _close(dst)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
