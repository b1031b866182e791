"""A TCP proxy that loses the gateway's answers: it forwards HTTP/2 connection frames from the
gateway to the client but drops every frame of a call (HEADERS, DATA, CONTINUATION, RST_STREAM),
so the gateway has done the work and the client never hears about it."""

from __future__ import annotations

import contextlib
import socket
import threading

# HTTP/2 frame types that belong to a call's answer.
_ANSWER_FRAMES = {0x0, 0x1, 0x3, 0x9}


class AnswerEatingProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.dropped_frames = 0
        # Set False to let answers through again (a test of a retry turns it off after a drop).
        self.eating = True
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
            threading.Thread(target=self._filter, args=(server, client), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)

    def _filter(self, source: socket.socket, sink: socket.socket) -> None:
        buffer = b""
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                buffer += data
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    frame, buffer = buffer[: 9 + length], buffer[9 + length :]
                    if frame[3] in _ANSWER_FRAMES and self.eating:
                        with self._lock:
                            self.dropped_frames += 1
                    else:
                        sink.sendall(frame)

    def cut(self) -> None:
        """Close every connection through the proxy, as a dropped network would."""
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def close(self) -> None:
        self.cut()
        self._listener.close()
