"""A TCP proxy on 127.0.0.1 in front of a server that cuts chosen connections mid-response, or
answers them with S3's 503 SlowDown: fault injection for object storage (a connection reset in
the middle of a ranged GET, a throttled request, an upload whose connection is reset)."""
from __future__ import annotations

import socket
import struct
import threading


class FlakyProxy:
    SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
                 b"<Message>Please reduce your request rate.</Message></Error>")

    def __init__(self, target_port: int, cut: set[int] = frozenset(), cut_after: int = 200_000,
                 busy: set[int] = frozenset(), reset_puts: int = 0, pass_puts: int = 0):
        """Connections numbered from 1; those in ``cut`` are reset after ``cut_after`` response
        bytes; those in ``busy`` get a 503 SlowDown answer to their first request; after
        ``pass_puts`` PUT requests (uploads) went through, the next ``reset_puts`` have their
        connection reset before they arrive."""
        self.target_port, self.cut, self.cut_after, self.busy = target_port, cut, cut_after, busy
        self.reset_puts, self.pass_puts = reset_puts, pass_puts
        self.throttled = self.put_resets = self.puts = 0
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.connections in self.busy:
                threading.Thread(target=self._slow_down, args=(client,), daemon=True).start()
                continue
            limit = self.cut_after if self.connections in self.cut else None
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, None, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None, requests: bool = False) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if requests and data.startswith(b"PUT ") and self._take_put_reset():
                    src.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                    break
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[:limit - sent])
                    self.cuts += 1
                    dst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                    # wake the thread reading requests from this socket: until it lets go, closing
                    # here sends nothing and the client waits out its read timeout instead
                    dst.shutdown(socket.SHUT_RD)
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            src.close()
            dst.close()

    def _take_put_reset(self) -> bool:
        with self._lock:
            self.puts += 1
            if self.puts <= self.pass_puts or self.put_resets >= self.reset_puts:
                return False
            self.put_resets += 1
            return True

    def _slow_down(self, client: socket.socket) -> None:
        try:
            client.recv(65536)  # the request line and headers
            head = (f"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                    f"Content-Length: {len(self.SLOW_DOWN)}\r\nConnection: close\r\n\r\n").encode()
            client.sendall(head + self.SLOW_DOWN)
            self.throttled += 1
        except OSError:
            pass
        finally:
            client.close()

    def close(self) -> None:
        self.sock.close()
