"""Export and serving: SavedModels in TF Serving's layout, an embedded server, and clients.

`export` writes DIR/NAME/V (`hagan-export`, with `warmup`'s request file); `server` serves DIR
(`hagan-serve`) from `registry` (loaded versions), `predictor` (checks, batching), `grpc_api`,
`rest_api` (TF Serving's JSON) and `rest_http` (the HTTP server). `client` talks to it or to the
real TF Serving over `transports`; `sample_cli` and `encode_cli` are `hagan-sample` and
`hagan-encode`. `json_arrays` writes and reads volumes as JSON for both ends of REST. Only what
both ends share lives here, so importing it is cheap.
"""

from __future__ import annotations

from ..layout import DEFAULT_MODEL_NAME  # noqa: F401 (the name's home is hagan_tf.layout)
# gRPC's own ceiling; TF Serving allows the same. A 256^3 float32 volume is 64 MiB.
MAX_MESSAGE_BYTES = 2**31 - 1
GRPC_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]

# Canonical gRPC code -> HTTP status, as TF Serving's REST API maps them (google.rpc.Code).
HTTP_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501, "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}


class ServingError(Exception):
    """A request failed with a canonical status code ("INVALID_ARGUMENT", "NOT_FOUND", ...)."""

    def __init__(self, code: str, message: str, http_status: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status or HTTP_STATUS.get(code, 500)


def shown(value, limit: int = 64) -> str:
    """repr of a name taken from a request, cut to `limit` characters: an error message that
    echoes a 10,000-character name would not fit in a gRPC status (8 KiB of metadata)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 4] + "...'"


def shown_list(values, most: int = 8) -> str:
    """A bounded list of request-given names, as `shown` bounds one."""
    values = sorted(values)
    more = f", and {len(values) - most} more" if len(values) > most else ""
    return "[" + ", ".join(shown(v) for v in values[:most]) + more + "]"


# A gRPC status travels in HTTP/2 trailers, and clients drop metadata over 8 KiB ("Stream
# removed"); REST errors are cut to the same length.
MAX_ERROR_CHARS = 2000


def bounded(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    return message if len(message) <= limit else message[:limit - 15] + " ... (cut short)"
