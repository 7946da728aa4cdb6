"""The listening socket and the HTTP/1.1 protocol under the app.

`listen_socket` binds the address before the model loads, so a port in use, a host that is not an
address of this machine or a name that does not resolve is one clear NanoseekError at once (not a
uvicorn log line and exit 3 after minutes of loading). The socket is then handed to uvicorn.

`JSONErrorProtocol` is uvicorn's h11 protocol with one change: a request the HTTP parser rejects
(a malformed request line or Content-Length, a NUL in the path, headers over the size limit, bytes
that are not HTTP) is answered in OpenAI's JSON error shape, like every other error of the server,
instead of uvicorn's plain-text "Invalid HTTP request received.".
"""

from __future__ import annotations

import json
import socket
import sys

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanoseek.errors import NanoseekError
from nanoseek.serve.protocol import APIError


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (IPv4 first where a name has both); NanoseekError if it cannot be."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, ValueError) as e:  # ValueError: a NUL or a label too long
        reason = getattr(e, "strerror", None) or str(e)
        raise NanoseekError(f"--host={host!r} is not an address or a name that resolves ({reason})") from None
    family, kind, proto, _, address = sorted(infos, key=lambda info: info[0] != socket.AF_INET)[0]
    sock = socket.socket(family, kind, proto)
    try:
        if sys.platform != "win32":  # restart at once on a port left in TIME_WAIT (on Windows it means sharing)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = " (another server listens there? choose another --port)" if e.errno in (48, 98, 10048) else ""
        raise NanoseekError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    return sock


class JSONErrorProtocol(H11Protocol):
    """h11's HTTP/1.1, with its 400 for unparsable requests in OpenAI's JSON error shape."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.protocol_error: h11.RemoteProtocolError | None = None
        next_event = self.conn.next_event  # the one connection serves every request of this socket

        def recording_next_event():
            try:
                return next_event()
            except h11.RemoteProtocolError as e:  # uvicorn drops it; its message and status are useful
                self.protocol_error = e
                raise

        self.conn.next_event = recording_next_event

    def send_400_response(self, msg: str) -> None:
        error = self.protocol_error
        status = error.error_status_hint if error is not None else 400
        status = status if 400 <= status < 500 else 400
        reason = str(error).split(": bytearray(")[0] if error is not None else ""  # not the request's bytes again
        detail = f": {reason}" if reason else ""
        body = json.dumps(APIError(status, f"invalid HTTP request{detail}", None, "invalid_http_request").body())
        body = body.encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=status, headers=headers)))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # h11 cannot answer in this state (e.g. mid-response): just close
            pass
        self.transport.close()
