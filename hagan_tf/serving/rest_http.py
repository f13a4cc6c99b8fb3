"""The HTTP server of `hagan-serve`'s REST API, on aiohttp's low-level server.

aiohttp parses and checks request lines and headers (line and header limits, one
Content-Length, chunked bodies, keep-alive and idle timeouts); everything it refuses is answered
here as `{"error": ...}` JSON with a proper status line, as TF Serving answers. Bodies are read
asynchronously, so a client that stalls mid-upload holds nothing but its own connection: other
requests go on being read and answered. A body is parsed and run only once it is complete, in a
pool of `max_concurrent` threads, since parsing JSON holds several times the body in memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from . import bounded


log = logging.getLogger("hagan_tf.serving")

SERVER_NAME = "hagan-serve"


def json_error(status: int, message: str, close: bool = False, **headers) -> web.Response:
    response = web.Response(status=status, body=json.dumps({"error": bounded(message)}).encode(),
                            content_type="application/json", headers={"Server": SERVER_NAME,
                                                                      **headers})
    if close:
        response.force_close()
    return response


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _JsonErrorHandler(web.RequestHandler):
    """aiohttp's connection handler, answering the requests its parser refuses (bad request
    lines, bad or duplicate headers, lines over the limits) as JSON instead of plain text."""

    def handle_error(self, request, status=500, exc=None, message=None):
        if status >= 500:
            log.error("REST %s: request failed", request.remote, exc_info=exc)
            text = f"internal error: {type(exc).__name__}" if exc else HTTPStatus(status).phrase
        else:
            log.debug("REST %s: refused: %s", request.remote, message or exc)
            if isinstance(exc, LineTooLong):
                text = f"request line or header over {self.max_line_size} bytes"
            else:  # aiohttp's first line says what; the rest draws the offending bytes
                first = str(message or exc or HTTPStatus(status).phrase).split("\n")[0]
                text = f"malformed HTTP request: {first.rstrip(':')}"
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already started; cannot send the error")
        return json_error(status, text, close=True)


class _JsonErrorServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class RestServer:
    """Binds at construction (so a taken port fails at once), serves in `serve_forever`."""

    READ_BUFSIZE = 1 << 20

    def __init__(self, address: tuple[str, int], app, max_body: int, max_concurrent: int = 4,
                 read_timeout: float = 60.0, keepalive_timeout: float = 75.0):
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=128)
        self.server_address = self.socket.getsockname()
        self.app, self.max_body, self.read_timeout = app, max_body, read_timeout
        self.keepalive_timeout = keepalive_timeout
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix="rest")
        self._ready = threading.Event()
        self._done = threading.Event()
        self._loop = self._stop = None

    # ------------------------------------------------------------ lifecycle

    def serve_forever(self) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            self._ready.set()
            self._done.set()

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        handler = _JsonErrorServer(self._handle, keepalive_timeout=self.keepalive_timeout,
                                   access_log=None, read_bufsize=self.READ_BUFSIZE)
        server = await self._loop.create_server(handler, sock=self.socket)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            await handler.shutdown(1.0)

    def shutdown(self) -> None:
        self._ready.wait()
        if self._loop is not None and not self._done.is_set():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._done.wait()

    def server_close(self) -> None:
        self.socket.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ requests

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        method, path = request.method, request.raw_path
        try:
            if method == "GET":
                status, payload = self.app.handle("GET", path, None)  # cheap: status, metadata
                body = json.dumps(payload).encode()
            elif method == "POST":
                data = await self._read_body(request)
                status, body = await self._loop.run_in_executor(self._pool, self._post, path, data)
            else:
                return json_error(405, f"{method} is not supported; use GET or POST",
                                  close=True, Allow="GET, POST")
        except _Refused as e:
            return json_error(e.status, e.message, close=True)
        log.debug("REST %s %s %s %d", request.remote, method, path[:200], status)
        return web.Response(status=status, body=body, content_type="application/json",
                            headers={"Server": SERVER_NAME})

    def _post(self, path: str, data: bytes) -> tuple[int, bytes]:
        status, payload = self.app.handle("POST", path, data)
        return status, json.dumps(payload).encode()

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        length = request.content_length  # aiohttp has checked it is one ASCII number
        if length is None and "chunked" not in request.headers.get("Transfer-Encoding", ""):
            raise _Refused(411, "a POST needs a Content-Length header")
        limit = f"the limit of {self.max_body} bytes (hagan-serve --max-rest-bytes)"
        if length is not None and length > self.max_body:  # refused unread, from the header
            raise _Refused(413, f"request body of {length} bytes exceeds {limit}")
        expect = request.headers.get("Expect", "").lower()
        if request.version >= (1, 1) and expect == "100-continue":
            # curl asks before sending a body over 1 KiB, and waits 1 s for this if not told
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # as aiohttp's router does: the answer is not begun
        chunks, size = [], 0
        while True:
            try:
                async with asyncio.timeout(self.read_timeout):
                    chunk = await request.content.readany()
            except TimeoutError:
                raise _Refused(408, f"no body bytes arrived for {self.read_timeout:g} s "
                                    f"({size} of {length or 'chunked'} read)") from None
            except (ConnectionError, HttpProcessingError) as e:  # the body ended early
                raise _Refused(400, f"incomplete body ({size} of {length} bytes): {e}") from None
            if not chunk:
                break
            size += len(chunk)
            if size > self.max_body:
                raise _Refused(413, f"request body exceeds {limit}")
            chunks.append(chunk)
        if length is not None and size != length:
            raise _Refused(400, f"incomplete body: {size} of {length} bytes (Content-Length)")
        return b"".join(chunks)
