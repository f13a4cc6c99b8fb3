"""The HTTP server of `hagan-serve`'s REST API, on aiohttp's low-level server.

aiohttp parses and checks request lines and headers (line and header limits, one
Content-Length, chunked bodies, keep-alive and idle timeouts); everything it refuses is answered
here as `{"error": ...}` JSON with a proper status line, as TF Serving answers. Bodies are read
asynchronously, so a client that stalls mid-upload holds nothing but its own connection: other
requests go on being read and answered. A body is parsed and run only once it is complete, in a
pool of `max_concurrent` threads, since parsing JSON holds several times the body in memory.

Added here: a client that half-closes its socket (`shutdown(SHUT_WR)`, `nc -N`) still gets its
answers, and a 400 when its body was cut short; at most `max_connections` connections are
open at once: past that, the one idle longest (no request begun) is closed for the newcomer,
and a newcomer that finds every connection busy gets a 503.
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
from .json_arrays import dumps as json_dumps


log = logging.getLogger("hagan_tf.serving")

SERVER_NAME = "hagan-serve"


def json_error(status: int, message: str, close: bool = False, **headers) -> web.Response:
    response = web.Response(status=status, body=json.dumps({"error": bounded(message)}).encode(),
                            content_type="application/json", headers={"Server": SERVER_NAME,
                                                                      **headers})
    if close:
        response.force_close()
    return response


def default_max_connections() -> int:
    """1000, or half the open-file limit (ulimit -n) where that is lower: each connection is a
    file descriptor, and the models, gRPC and TensorFlow need some of their own."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        return 1000
    return 1000 if soft == resource.RLIM_INFINITY else max(16, min(1000, soft // 2))


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _CutShort(ConnectionError):
    """The client closed its side of the connection before its body was complete."""


class _JsonErrorHandler(web.RequestHandler):
    """aiohttp's connection handler, answering the requests its parser refuses (bad request
    lines, bad or duplicate headers, lines over the limits) as JSON instead of plain text, and
    answering clients that half-close their side."""

    def __init__(self, manager, **kwargs):
        super().__init__(manager, **kwargs)
        self.idle_since = self._loop.time()
        self.peer_done = False  # the client sent its end of input
        self.refused = False  # over the connection limit with nothing to close for it
        self.decided = 0  # answers begun: their requests will read no more of their bodies
        self.answered = 0  # answers written in full (aiohttp counts the request heads)
        self._last_body = None  # the body of the newest request, which may still be arriving

    @property
    def closing(self) -> bool:
        return self._force_close

    def idle(self) -> bool:
        """Every request received has been answered (the next one may be on its way, its
        head incomplete): closing this connection loses nothing."""
        return self._request_count == self.answered and not self.closing

    def last_request(self) -> bool:
        """The client half-closed and no request of it waits after the current one."""
        return self.peer_done and not self._messages

    async def finish_response(self, request, resp, start_time):
        self.decided += 1
        try:
            return await super().finish_response(request, resp, start_time)
        finally:  # only now: a connection still writing its answer is not idle
            self.answered += 1
            self.idle_since = self._loop.time()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages:
            self._last_body = self._messages[-1][1]

    def eof_received(self) -> bool:
        # aiohttp closes the connection at end of input, before the answers to what was sent.
        # A client may half-close after its request (nc -N, shutdown(SHUT_WR)): answer it, then
        # close; a body still incomplete now never will be: it gets a 400.
        self.peer_done = True
        body = self._last_body
        if body is not None and not body.is_eof():
            if self.decided == self._request_count:  # answered (a 413, say): aiohttp reads
                body.feed_eof()  # the rest only to discard it
            else:
                body.set_exception(_CutShort(f"the client closed its side of the connection "
                                             f"after {body.total_bytes} body bytes"))
        if self.idle():
            return False  # nothing to answer: the transport closes itself
        if not self._messages:
            self._close = True  # close once the request in progress is answered
        return True

    def handle_error(self, request, status=500, exc=None, message=None):
        if status >= 500:
            log.error("REST %s: request failed", request.remote, exc_info=exc)
            text = f"internal error: {type(exc).__name__}" if exc else HTTPStatus(status).phrase
        else:
            log.debug("REST %s: refused: %s", request.remote, message or exc)
            if isinstance(exc, LineTooLong):
                text = f"request line or header over {self.max_line_size} bytes"
            elif "Missing 'Host' header" in str(message or exc):
                text = ("an HTTP/1.1 request needs a Host header (RFC 9112; curl and HTTP "
                        "libraries send one): add `Host: localhost`, or send HTTP/1.0")
            else:  # aiohttp's first line says what; the rest draws the offending bytes
                first = str(message or exc or HTTPStatus(status).phrase).split("\n")[0]
                text = f"malformed HTTP request: {first.rstrip(':')}"
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already started; cannot send the error")
        return json_error(status, text, close=True)


class _JsonErrorServer(web.Server):
    """Makes _JsonErrorHandlers, and keeps at most max_connections of them open."""

    def __init__(self, handler, max_connections: int, **kwargs):
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.evicted = 0

    def __call__(self) -> web.RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: _JsonErrorHandler, transport) -> None:
        super().connection_made(handler, transport)
        if len(self._connections) <= self.max_connections:  # closing ones counted too
            return
        open_ = [h for h in self._connections if not h.closing]
        if len(open_) <= self.max_connections:
            return
        idle = [h for h in open_ if h is not handler and h.idle()]
        if idle:  # a client that sends nothing, or a keep-alive connection between requests
            oldest = min(idle, key=lambda h: h.idle_since)
            log.debug("REST: %d connections (--max-rest-connections): closing one idle for "
                      "%.1f s", len(open_), self._loop.time() - oldest.idle_since)
            self.evicted += 1
            oldest.force_close()
        else:  # every other connection is in the middle of a request
            handler.refused = True


class RestServer:
    """Binds at construction (so a taken port fails at once), serves in `serve_forever`."""

    READ_BUFSIZE = 1 << 20

    def __init__(self, address: tuple[str, int], app, max_body: int, max_concurrent: int = 4,
                 read_timeout: float = 60.0, keepalive_timeout: float = 75.0,
                 max_connections: int | None = None):
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=128)
        self.server_address = self.socket.getsockname()
        self.app, self.max_body, self.read_timeout = app, max_body, read_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections or default_max_connections()
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
        handler = _JsonErrorServer(self._handle, self.max_connections,
                                   keepalive_timeout=self.keepalive_timeout, access_log=None,
                                   read_bufsize=self.READ_BUFSIZE)
        self._web_server = handler
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

    def open_connections(self) -> int:
        """REST connections open now (those being closed left out); from any thread."""
        return self._on_loop(lambda handlers: sum(not h.closing for h in handlers))

    def idle_connections(self) -> int:
        """Open connections with no request in progress or waiting; from any thread."""
        return self._on_loop(lambda handlers: sum(h.idle() for h in handlers))

    def _on_loop(self, count) -> int:
        self._ready.wait()

        async def run():
            return count(self._web_server.connections)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(30)

    def server_close(self) -> None:
        self.socket.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ requests

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        response = await self._respond(request)
        if request.protocol.last_request():  # the client half-closed: this is its last answer
            response.force_close()
        return response

    async def _respond(self, request: web.BaseRequest) -> web.StreamResponse:
        method, path = request.method, request.raw_path
        if request.protocol.refused:
            return json_error(503, f"too many connections: all {self.max_connections} are busy "
                                   "(hagan-serve --max-rest-connections); retry", close=True,
                              **{"Retry-After": "1"})
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
        return status, json_dumps(payload)  # volumes written by NumPy, not float by float

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
            except _CutShort as e:
                request.content.feed_eof()  # nothing more will come: aiohttp need not wait
                raise _Refused(400, f"incomplete body: {e}, of {length or 'a chunked body'} "
                                    "(Content-Length)") from None
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
