"""HTTP/1.1 over a raw socket, for requests no HTTP client will send: a Content-Length that lies,
a body cut off, headers trickled or too large, a request line that is not HTTP at all.

Loopback only: every helper connects to 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    seconds: float  # from the end of sending to the end of the response
    closed: bool | None = None  # the server closed the connection after it (None: not checked)

    def error(self) -> dict:
        """The `error` object of our JSON error shape (fails the test if the body is not one)."""
        return json.loads(self.body)["error"]


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_response(sock: socket.socket) -> RawResponse:
    """Read one response (Content-Length or chunked framing) from `sock`."""
    start = time.monotonic()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection before a whole response head: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection in the middle of a response body")
            rest += chunk
        body = rest[:length]
    else:  # chunked: enough for our small error bodies
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body, pos = b"", 0
        while True:
            size_end = rest.index(b"\r\n", pos)
            size = int(rest[pos:size_end], 16)
            if size == 0:
                break
            body += rest[size_end + 2:size_end + 2 + size]
            pos = size_end + 2 + size + 2
    return RawResponse(int(status_line.split(" ")[1]), headers, body, time.monotonic() - start)


def wait_closed(sock: socket.socket, timeout: float) -> bool:
    """Whether the server ends the connection (EOF or reset) within `timeout`, discarding what it sends."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def exchange(port: int, data: bytes, *, half_close: bool = False, timeout: float = 10.0,
             check_closed: float | None = None) -> RawResponse:
    """Send `data` as is (then shut our side when `half_close`), read one response; with
    `check_closed`, also wait up to that many seconds for the server to close the connection."""
    with connect(port, timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before taking everything: read its answer
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        response = read_response(sock)
        if check_closed is not None:
            response.closed = wait_closed(sock, check_closed)
        return response


def request_head(method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
