"""`hagan-serve`: TF Serving's gRPC and REST APIs over a model base directory, for development.

It serves the newest version of every model DIR/NAME/V that `hagan-export` writes, polls DIR so
a new version (or model) is picked up without a restart, and answers the same requests, with
the same status codes, as TF Serving: clients written against this server work against the
real one. Every request is checked against the signature before it runs, a failing request
never takes the server down, and request size, batch size and concurrent executions are capped.

The parts: `registry` (loaded versions, warmed up from the export's warmup file), `predictor`
(checks, batching), `grpc_api`, `rest_api` and `rest_http`; this module wires them together.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from . import MAX_MESSAGE_BYTES
from .grpc_api import grpc_server
from .predictor import DEFAULT_SIGNATURE, RUN_VOXELS, Predictor  # noqa: F401 (old import path)
from .registry import ModelRegistry, Servable  # noqa: F401 (old import path)
from .rest_api import RestApp
from .rest_http import RestServer, default_max_connections

log = logging.getLogger("hagan_tf.serving")

MAX_REST_BYTES = 256 << 20  # a 256^3 float32 volume is ~200 MB of JSON; parsing holds ~7x


class Server:
    """gRPC + REST servers over one model registry, with a thread that polls the model base."""

    def __init__(self, model_base: str, host: str = "127.0.0.1", port: int = 8500,
                 rest_port: int | None = 8501, poll_seconds: float = 5.0,
                 max_request_bytes: int = MAX_MESSAGE_BYTES, max_batch: int = 16,
                 max_concurrent: int = 4, grpc_threads: int = 16,
                 max_rest_bytes: int = MAX_REST_BYTES, run_voxels: int = RUN_VOXELS,
                 rest_read_timeout: float = 60.0, warmup: bool = True,
                 max_rest_connections: int | None = None):
        if not os.path.isdir(model_base):
            raise FileNotFoundError(f"model base {model_base!r} is not a directory")
        self.registry = ModelRegistry(model_base, warmup)
        self.predictor = Predictor(self.registry, max_batch, max_concurrent, run_voxels)
        self.host, self.poll_seconds = host, poll_seconds
        self._stop = threading.Event()
        self._started = False
        self.registry.refresh()

        self.grpc_server = grpc_server(self.predictor, min(max_request_bytes, MAX_MESSAGE_BYTES),
                                       MAX_MESSAGE_BYTES, grpc_threads)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self.grpc_server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot bind gRPC to {address}: {e}") from None
        if not self.port:
            raise OSError(f"cannot bind gRPC to {address}")
        self.rest = None
        self.rest_port = None
        if rest_port is not None:
            try:
                self.rest = RestServer((host, rest_port), RestApp(self.predictor),
                                       max_rest_bytes, max_concurrent, rest_read_timeout,
                                       max_connections=max_rest_connections)
            except OSError as e:
                raise OSError(f"cannot bind REST to {host}:{rest_port}: {e}") from None
            self.rest_port = self.rest.server_address[1]

    def start(self) -> "Server":
        self._started = True
        self.grpc_server.start()
        threads = [threading.Thread(target=self._poll, name="model-poll", daemon=True)]
        if self.rest is not None:
            threads.append(threading.Thread(target=self.rest.serve_forever, name="rest",
                                            daemon=True))
        for t in threads:
            t.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.poll_seconds):
            try:
                self.registry.refresh()
            except Exception:  # noqa: BLE001 - e.g. the model base vanished for a moment
                log.exception("polling %s failed", self.registry.model_base)

    def stop(self):
        self._stop.set()
        if self.rest is not None:
            if self._started:
                self.rest.shutdown()
            self.rest.server_close()
        self.grpc_server.stop(grace=1.0).wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hagan-serve",
        description="Serve the newest version of every model under DIR over TF Serving's gRPC "
                    "and REST APIs (development server; TF Serving itself serves the same DIR).")
    p.add_argument("--model-base", required=True, help="directory of NAME/VERSION SavedModels")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8500, help="gRPC port; 0 picks a free one")
    p.add_argument("--rest-port", type=int, default=8501, help="REST port; 0 picks a free one")
    p.add_argument("--no-rest", action="store_true", help="serve gRPC only")
    p.add_argument("--poll-seconds", type=float, default=5.0,
                   help="how often to look for new versions (default: %(default)s)")
    p.add_argument("--max-request-bytes", type=int, default=MAX_MESSAGE_BYTES,
                   help="largest gRPC message accepted (default: 2 GiB - 1)")
    p.add_argument("--max-rest-bytes", type=int, default=MAX_REST_BYTES,
                   help="largest REST body accepted (default: 256 MiB, one 256^3 volume as JSON; "
                        "parsing JSON takes several times the body)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="largest batch one request may ask for (default: %(default)s)")
    p.add_argument("--run-voxels", type=int, default=RUN_VOXELS,
                   help="a request's samples run in groups of at most this many voxels (default: "
                        "2 x 256^3, i.e. 2 volumes at 256^3 and 16 at 128^3): bounds the memory "
                        "of one execution")
    p.add_argument("--max-concurrent", type=int, default=4,
                   help="model executions at once; more requests wait (default: %(default)s)")
    p.add_argument("--grpc-max-threads", type=int, default=16,
                   help="gRPC worker threads (default: %(default)s)")
    p.add_argument("--rest-read-timeout", type=float, default=60.0,
                   help="seconds a REST upload may stall before it is refused with 408 "
                        "(default: %(default)s)")
    p.add_argument("--max-rest-connections", type=int, default=None,
                   help="REST connections open at once (default: 1000, or half of `ulimit -n` "
                        f"if lower: {default_max_connections()} here). Past it, the connection "
                        "idle longest is closed for a new one, and a new one that finds all "
                        "busy with requests gets 503")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the export's warmup requests at load (TF Serving's "
                        "--enable_model_warmup=false); the first request per signature is slower")
    p.add_argument("-v", "--verbose", action="store_true", help="log every REST request")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("port", "rest_port"):
        if not 0 <= getattr(args, flag) <= 65535:
            parser.error(f"--{flag.replace('_', '-')} must be in 0..65535")
    for flag in ("max_request_bytes", "max_rest_bytes", "max_batch", "max_concurrent",
                 "grpc_max_threads", "run_voxels", "max_rest_connections"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("poll_seconds", "rest_read_timeout"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0")
    if not os.path.isdir(args.model_base):
        parser.error(f"--model-base {args.model_base!r} is not a directory")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        server = Server(args.model_base, args.host, args.port,
                        None if args.no_rest else args.rest_port, args.poll_seconds,
                        args.max_request_bytes, args.max_batch, args.max_concurrent,
                        args.grpc_max_threads, args.max_rest_bytes, args.run_voxels,
                        args.rest_read_timeout, not args.no_warmup, args.max_rest_connections)
    except OSError as e:
        print(f"hagan-serve: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    models = ", ".join(server.registry.names()) or f"none yet (watching {args.model_base})"
    rest = f", REST on http://{args.host}:{server.rest_port}" if server.rest else ""
    print(f"hagan-serve: gRPC on {args.host}:{server.port}{rest}; models: {models}", flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
