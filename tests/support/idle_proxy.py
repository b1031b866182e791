"""A TCP proxy that closes a connection after it carried nothing either way for `idle_seconds`,
as load balancers and NATs do (an AWS load balancer's idle timeout, a NAT's mapping expiry)."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from types import TracebackType


class IdleCuttingProxy:
    def __init__(self, target: tuple[str, int], idle_seconds: float) -> None:
        self.target = target
        self.idle_seconds = idle_seconds
        self.connections = 0
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.connections += 1
            threading.Thread(target=self._relay, args=(client, server), daemon=True).start()

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        peer = {client: server, server: client}
        with selectors.DefaultSelector() as selector, client, server:
            for end in peer:
                selector.register(end, selectors.EVENT_READ)
            last_traffic = time.monotonic()
            while not self._closed.is_set():
                left = self.idle_seconds - (time.monotonic() - last_traffic)
                if left <= 0:
                    self.cuts += 1
                    return
                for key, _ in selector.select(min(left, 0.2)):
                    ready = key.fileobj
                    assert isinstance(ready, socket.socket)
                    try:
                        data = ready.recv(65536)
                        if not data:
                            return
                        peer[ready].sendall(data)
                    except OSError:
                        return
                    last_traffic = time.monotonic()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()

    def __enter__(self) -> IdleCuttingProxy:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
