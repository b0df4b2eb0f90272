"""The SDK never pipelines: a connection carries its next request only after the previous
response was read (docs/adr/0004-hypercorn-pipelining.md).

A raw HTTP/1.1 server on a thread answers `GET /v1/markets` on keep-alive connections. Before
it writes a response it waits up to `PIPELINE_WAIT_S` for more bytes on that connection: a
client that pipelines would have written its next request by then; a client that does not
cannot, since it is waiting for this response.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

import trio

from api.sdk import AsyncClient, Client, Credentials

PIPELINE_WAIT_S = 0.05
BODY = b'{"markets": []}'


class RecordingServer:
    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests_per_connection: list[int] = []
        self.early_bytes = 0  # requests that found the next request already sent
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.closed = False

    def __enter__(self) -> RecordingServer:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self.threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True
        # shutdown wakes the accept() blocked on the listener (close alone does not on Linux)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for thread in list(self.threads):
            thread.join(10)
            assert not thread.is_alive()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        served = 0
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        with self.lock:
                            self.requests_per_connection.append(served)
                        return
                    buf += data
                _, buf = buf.split(b"\r\n\r\n", 1)  # GETs: no body
                ready, _, _ = select.select([conn], [], [], PIPELINE_WAIT_S)
                if buf or ready:
                    with self.lock:
                        self.early_bytes += 1
                served += 1
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
                )


CREDS = Credentials("trade-x", "00" * 32, "trader", "alice")


def test_sync_client_reuses_a_connection_without_pipelining() -> None:
    with RecordingServer() as server, Client([server.url], CREDS) as client:
        for _ in range(20):
            assert client.markets() == []
    assert server.early_bytes == 0
    assert sum(server.requests_per_connection) == 20
    assert max(server.requests_per_connection) > 1  # keep-alive: connections were reused


def test_async_client_concurrent_calls_never_share_a_busy_connection() -> None:
    async def main(url: str) -> None:
        async with AsyncClient([url], CREDS) as client:
            for _ in range(5):
                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(client.markets)

    with RecordingServer() as server:
        trio.run(main, server.url)
    assert server.early_bytes == 0
    assert sum(server.requests_per_connection) == 40
    assert max(server.requests_per_connection) > 1
