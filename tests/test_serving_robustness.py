"""hagan-serve against the malformed requests a fuzz found (issue 24): one test per defect, the
slow-client test, and the TF Serving warmup file. The server runs as a subprocess with only
options that older versions also had, so each test can be run against an older checkout."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from hagan_tf import HAGAN, HAGANConfig
from hagan_tf.serving import GRPC_OPTIONS
from hagan_tf.serving.export import export_model

CFG = HAGANConfig(size=32, width=0.125, latent_dim=16)
MAX_BYTES = 1 << 20
PREVIEW = json.dumps({"signature_name": "generate_preview",
                      "inputs": {"z": [[0.5] * 16]}}).encode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model_base, grpc_port, rest_port, log path) of a hagan-serve subprocess."""
    root = tmp_path_factory.mktemp("robust")
    base = str(root / "models")
    export_model(HAGAN(CFG), base, "hagan", 1)
    log_path = root / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hagan_tf.serving.server", "--model-base", base, "--port", "0",
         "--rest-port", "0", "--max-rest-bytes", str(MAX_BYTES), "--max-batch", "4"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"gRPC on 127\.0\.0\.1:(\d+), REST on http://127\.0\.0\.1:(\d+)", line)
        assert m, f"unexpected first line {line!r}; log:\n{log_path.read_text()}"
        yield base, int(m[1]), int(m[2]), log_path
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == 0


@pytest.fixture(scope="module")
def predict(served):
    channel = grpc.insecure_channel(f"127.0.0.1:{served[1]}", options=GRPC_OPTIONS)
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
    channel.close()


def _request(signature, **inputs):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "hagan"
    request.model_spec.signature_name = signature
    for k, v in inputs.items():
        request.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    return request


def _grpc_error(predict, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        predict(request, timeout=60)
    return e.value


def _raw(port, data: bytes, half_close=False, timeout=5.0):
    """Send bytes as they are; (status line, headers, body) of the answer, or None when the
    server closed the connection without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = s.recv(65536)
            if not chunk:
                assert received == b"", f"a partial answer: {received!r}"
                return None
            received += chunk
        head, body = received.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        length = int(headers.get("content-length", 0))
        while len(body) < length and not data.startswith(b"HEAD"):
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return lines[0], headers, body


def _post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode()
            + extra + b"\r\n" + body)


def _json_error(answer, status: int):
    assert answer is not None, "no answer"
    line, headers, body = answer
    assert re.fullmatch(rf"HTTP/1\.[01] {status} \S.*", line), line
    assert headers["content-type"].startswith("application/json"), headers
    message = json.loads(body)["error"]
    assert isinstance(message, str) and message
    return message


def test_stalled_uploads_do_not_block_other_clients(served):
    """Defect 1: eight uploads that stop after one byte; good REST predicts still answer fast."""
    _, _, port, _ = served
    stalled = []
    try:
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"POST /v1/models/hagan:predict HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Length: 100000\r\n\r\n{")
            stalled.append(s)
        time.sleep(0.5)  # let the server start reading every one of them
        for _ in range(3):
            start = time.perf_counter()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/hagan:predict",
                                         data=PREVIEW)
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200 and len(json.loads(r.read())["outputs"]) == 1
            assert time.perf_counter() - start < 2.0
    finally:
        for s in stalled:
            s.close()


def test_non_ascii_digits_are_a_400_not_a_500(served):
    """Defect 2: str.isdigit takes "²", which int() refuses."""
    _, _, port, log_path = served
    for path in (b"/v1/models/hagan/versions/\xb2", b"/v1/models/hagan/versions/\xb9",
                 b"/v1/models/hagan/versions/%C2%B2"):
        _json_error(_raw(port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"), 400)
    for path in (b"/v1/models/hagan/versions/\xb2:predict",
                 b"/v1/models/hagan/versions/%C2%B2:predict"):
        data = (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: "
                + str(len(PREVIEW)).encode() + b"\r\n\r\n" + PREVIEW)
        _json_error(_raw(port, data), 400)
    assert "ValueError" not in log_path.read_text()


def test_a_non_ascii_content_length_gets_an_answer(served):
    """Defect 3: `Content-Length: ²` closed the connection without any response."""
    _, _, port, _ = served
    data = b"POST /v1/models/hagan:predict HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n"
    _json_error(_raw(port, data), 400)


def test_bytes_that_are_not_utf8_are_invalid_argument(served, predict):
    """Defect 4: a `format` of b"\\xff" made TF's error message undecodable: INTERNAL."""
    error = _grpc_error(predict, _request("config", format=np.asarray(b"\xff", object)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()


def test_a_long_name_is_not_echoed_in_full(served, predict):
    """Defect 5: a 10,000-character input name, copied into the status, overflowed gRPC's
    metadata limit; over REST the same name (and a long model name) is cut short too."""
    _, _, port, _ = served
    long = "x" * 10_000
    z = np.zeros((1, 16), np.float32)
    error = _grpc_error(predict, _request("generate", z=z, **{long: z}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown" in error.details() and len(error.details()) < 1000
    many = _grpc_error(predict, _request("generate", z=z, **{f"w{i}" * 50: z for i in range(200)}))
    assert many.code() == grpc.StatusCode.INVALID_ARGUMENT and len(many.details()) < 2500
    body = json.dumps({"signature_name": "generate", "inputs": {"z": [[0.0] * 16], long: [1]}})
    answer = _raw(port, _post("/v1/models/hagan:predict", body.encode()))
    assert len(_json_error(answer, 400)) < 1000
    assert len(_json_error(_raw(port, f"GET /v1/models/{'m' * 6000} HTTP/1.1\r\nHost: x\r\n\r\n"
                                      .encode()), 404)) < 1000


def test_an_unknown_signature_is_failed_precondition_as_in_tf_serving(served, predict):
    """Defect 6: TF Serving answers FAILED_PRECONDITION,
    `Serving signature key "nope" not found.`"""
    _, _, port, _ = served
    error = _grpc_error(predict, _request("nope", z=np.zeros((1, 16), np.float32)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details().startswith('Serving signature key "nope" not found.')
    body = json.dumps({"signature_name": "nope", "inputs": {"z": [[0.0] * 16]}}).encode()
    message = _json_error(_raw(port, _post("/v1/models/hagan:predict", body)), 400)
    assert message.startswith('Serving signature key "nope" not found.')


def test_booleans_are_not_numbers(served):
    """Defect 7: NumPy reads [true, 0] as the integers [1, 0]."""
    _, _, port, _ = served
    volume = np.zeros((1, 32, 32, 32, 1)).tolist()
    volume[0][5][6][7][0] = True
    for signature, inputs in [("generate_from_seed", {"seed": [True, 0]}),
                              ("generate_from_seed", {"seed": [True]}),
                              ("generate", {"z": [[0.0] * 15 + [False]]}),
                              ("encode", {"volume": volume})]:
        body = json.dumps({"signature_name": signature, "inputs": inputs}).encode()
        message = _json_error(_raw(port, _post("/v1/models/hagan:predict", body)), 400)
        assert "booleans" in message, message
    # the bytes "true" elsewhere in a body are no boolean
    body = json.dumps({"signature_name": "generate_preview", "inputs": {"z": [[0.0] * 16]},
                       "note": "true"}).encode()
    assert _raw(port, _post("/v1/models/hagan:predict", body))[0].endswith("200 OK")


def test_an_incomplete_body_is_never_run(served):
    """Defect 8: Content-Length 1000, a valid 58-byte body and a half-close gave 200; then no
    answer at all (aiohttp closed the connection at end of input): a 400 that says why."""
    _, _, port, _ = served
    body = json.dumps({"signature_name": "generate_preview", "inputs": {"z": [[0] * 16]}})
    assert len(body) < 1000
    data = (b"POST /v1/models/hagan:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
            + body.encode())
    message = _json_error(_raw(port, data, half_close=True), 400)
    assert "incomplete body" in message and f"after {len(body)} body bytes" in message, message
    for head in (b"Content-Length: 1000\r\n\r\n", b"Transfer-Encoding: chunked\r\n\r\n5\r\n"):
        data = b"POST /v1/models/hagan:predict HTTP/1.1\r\nHost: x\r\n" + head + b"{\"a\""
        assert "incomplete body" in _json_error(_raw(port, data, half_close=True), 400)


def _answers(port, data: bytes, timeout=10.0) -> bytes:
    """Everything the server sends after `data` and a half-close, until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
        return received


def test_a_client_that_half_closes_after_its_requests_gets_every_answer(served):
    """`nc -N` and shutdown(SHUT_WR) clients: the end of input is not the end of the answers."""
    _, _, port, _ = served
    answer = _answers(port, _post("/v1/models/hagan:predict", PREVIEW))
    assert answer.startswith(b"HTTP/1.1 200 OK") and b'{"outputs": [[[[[' in answer, answer[:300]
    get = b"GET /v1/models/hagan HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = _answers(port, get + _post("/v1/models/hagan:predict", PREVIEW) + get)
    assert answer.count(b"HTTP/1.1 200 OK") == 3, answer[:600]  # then the server closed


def test_a_request_without_host_is_served_over_http_1_0(served):
    """HTTP/1.0 needs no Host (printf | nc, simple tools): served. HTTP/1.1 requires one (RFC
    9112 section 3.2; aiohttp enforces it, curl and every HTTP library send it): a 400 that says
    how to fix the request."""
    _, _, port, _ = served
    line, _, body = _raw(port, b"GET /v1/models/hagan HTTP/1.0\r\n\r\n")
    assert line.startswith("HTTP/1.0 200") and "AVAILABLE" in body.decode()
    post = (f"POST /v1/models/hagan:predict HTTP/1.0\r\nContent-Length: {len(PREVIEW)}\r\n\r\n"
            .encode() + PREVIEW)
    line, _, body = _raw(port, post)
    assert line.startswith("HTTP/1.0 200") and len(json.loads(body)["outputs"]) == 1
    message = _json_error(_raw(port, b"GET /v1/models/hagan HTTP/1.1\r\n\r\n"), 400)
    assert "Host header" in message and "HTTP/1.0" in message, message


class _EchoApp:
    def handle(self, method, path, body):
        return 200, {"bytes": len(body or b"")}


def test_idle_connections_are_capped_and_good_requests_still_answered():
    """Thousands of idle connections would exhaust file descriptors: past the cap, the one idle
    longest is closed for a newcomer; a newcomer that finds every connection mid-request gets
    a 503; good requests are answered throughout."""
    from hagan_tf.serving.rest_http import RestServer

    server = RestServer(("127.0.0.1", 0), _EchoApp(), max_body=MAX_BYTES, max_connections=16)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    idle, stalled = [], []
    try:
        for i in range(200):  # silent, or a request head never finished
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 2:
                s.sendall(b"GET /v1/models/m HTTP/1.1\r\nHost: x\r\n")
            idle.append(s)
        for _ in range(5):
            start = time.perf_counter()
            assert json.loads(_raw(port, _post("/m", b"x" * 10), timeout=10)[2]) == {"bytes": 10}
            assert time.perf_counter() - start < 2.0
        assert server.open_connections() <= 17
        closed = 0
        for s in idle[:150]:  # the oldest: closed by the server for the newer ones
            s.settimeout(10)
            try:
                closed += s.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == 150
        for _ in range(16):  # every slot mid-upload: a newcomer is refused, not queued
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /m HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            stalled.append(s)
        deadline = time.monotonic() + 10
        while server.open_connections() - server.idle_connections() < 16:
            assert time.monotonic() < deadline, "the uploads did not all begin"
            time.sleep(0.05)
        answer = _raw(port, _post("/m", b"x" * 10), timeout=10)
        assert "--max-rest-connections" in _json_error(answer, 503)
        assert answer[1]["retry-after"] == "1"
        for s in stalled:
            s.close()
        deadline = time.monotonic() + 10
        while True:  # the slots come free as the server sees the uploads end
            answer = _raw(port, _post("/m", b"x" * 10), timeout=10)
            if answer[0].endswith("200 OK") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert json.loads(answer[2]) == {"bytes": 10}
    finally:
        for s in idle + stalled:
            s.close()
        server.shutdown()
        server.server_close()


def test_the_connection_cap_is_a_documented_option(capsys):
    from hagan_tf.serving.rest_http import default_max_connections
    from hagan_tf.serving.server import build_parser, main

    parser = build_parser()
    assert parser.parse_args(["--model-base", ".", "--max-rest-connections", "5"]) \
        .max_rest_connections == 5
    assert "--max-rest-connections" in parser.format_help()
    with pytest.raises(SystemExit):
        main(["--model-base", ".", "--max-rest-connections", "0"])
    assert "--max-rest-connections must be >= 1" in capsys.readouterr().err
    assert 16 <= default_max_connections() <= 1000
    readme = open(os.path.join(os.path.dirname(__file__), "..", "serving", "README.md")).read()
    assert "--max-rest-connections" in readme


def test_a_stalled_body_times_out_with_408(tmp_path):
    """The other half of defect 8: a body that stops coming is refused after --rest-read-timeout."""
    from hagan_tf.serving.rest_http import RestServer

    class App:
        def handle(self, method, path, body):
            return 200, {"bytes": len(body)}

    server = RestServer(("127.0.0.1", 0), App(), max_body=MAX_BYTES, read_timeout=0.5)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        data = b"POST /m HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{}"
        start = time.perf_counter()
        assert "0.5 s" in _json_error(_raw(port, data), 408)
        assert time.perf_counter() - start < 5
        assert json.loads(_raw(port, _post("/m", b"x" * 10))[2]) == {"bytes": 10}
    finally:
        server.shutdown()
        server.server_close()


def test_conflicting_content_lengths_are_refused(served):
    """Defect 9: two different Content-Length headers gave 200."""
    _, _, port, _ = served
    data = _post("/v1/models/hagan:predict", PREVIEW, extra=b"Content-Length: 5\r\n")
    _json_error(_raw(port, data), 400)


@pytest.mark.parametrize("data, status", [
    (b"HEAD /v1/models/hagan HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"OPTIONS /v1/models/hagan HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"PUT /v1/models/hagan HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    (b"FOO /v1/models/hagan HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET\r\n\r\n", 400),
    (b"GET /v1/models/hagan HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /v1/models/hagan HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 400),
])
def test_every_error_is_json_with_a_status_line(served, data, status):
    """Defect 10: HTML bodies for HEAD, OPTIONS, unknown methods, 414 and 431; a body without
    a status line for malformed request lines."""
    _, _, port, _ = served
    answer = _raw(port, data)
    if data.startswith(b"HEAD"):  # no body in an answer to HEAD, but the JSON type
        assert answer[0].split(" ", 1)[1].startswith(f"{status} ")
        assert answer[1]["content-type"].startswith("application/json")
    else:
        _json_error(answer, status)


def test_an_empty_batch_is_answered_in_the_requests_terms(served, predict):
    """Defect 11: a batch of 0 said "Incompatible shapes: [0,8,8,8,64] vs. [0,1,1,1,32]"."""
    _, _, port, _ = served
    response = predict(_request("generate", z=np.zeros((0, 16), np.float32)), timeout=60)
    assert tf.make_ndarray(response.outputs["volume"]).shape == (0, 32, 32, 32, 1)
    body = json.dumps({"signature_name": "generate", "inputs": {"z": []}}).encode()
    message = _json_error(_raw(port, _post("/v1/models/hagan:predict", body)), 400)
    assert "has shape [0]" in message and "Incompatible" not in message


def test_non_finite_inputs_are_refused(served, predict):
    """NaN and Inf gave all-NaN volumes, written as bare NaN (not JSON) over REST."""
    _, _, port, _ = served
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        body = PREVIEW.replace(b"[[0.5", b"[[" + literal)
        message = _json_error(_raw(port, _post("/v1/models/hagan:predict", body)), 400)
        assert "finite" in message, message
    for value in (np.nan, np.inf):
        z = np.zeros((1, 16), np.float32)
        z[0, 3] = value
        error = _grpc_error(predict, _request("generate_preview", z=z))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN or Inf" in error.details()


def test_non_finite_outputs_are_written_as_tf_serving_writes_them(tmp_path):
    """A model whose outputs are NaN (its weights are): REST writes NaN, as TF Serving's REST
    API does (json_tensor.cc writes NaN, Infinity and -Infinity), which Python's json reads;
    the same values as gRPC."""
    from hagan_tf.serving.client import Client
    from hagan_tf.serving.server import Server

    gan = HAGAN(CFG)
    z = np.zeros((1, 16), np.float32)
    gan.generator.preview(z)  # built
    for weight in gan.generator.weights:
        weight.assign(np.full(weight.shape, np.nan, np.float32))
    export_model(gan, str(tmp_path), "broken", 1)
    with Server(str(tmp_path), port=0, rest_port=0, warmup=False) as server:
        body = json.dumps({"signature_name": "generate_preview", "inputs": {"z": z.tolist()}})
        line, headers, reply = _raw(server.rest_port, _post("/v1/models/broken:predict",
                                                             body.encode()))
        assert line.endswith("200 OK") and headers["content-type"].startswith("application/json")
        assert reply.startswith(b'{"outputs": [[[[[NaN],[NaN]') and b"null" not in reply
        volume = np.asarray(json.loads(reply)["outputs"], np.float32)
        assert volume.shape == (1, 8, 8, 8, 1) and np.isnan(volume).all()
        for address, rest in ((f"127.0.0.1:{server.port}", False),
                              (f"127.0.0.1:{server.rest_port}", True)):
            with Client(address, rest=rest, model="broken") as client:
                assert np.isnan(client.preview(z)).all()


@pytest.mark.parametrize("length", [10**12, 10**26])
def test_a_huge_content_length_is_refused_from_the_header(served, length):
    """Nothing of the body is sent: the answer must not wait for it."""
    _, _, port, _ = served
    data = (f"POST /v1/models/hagan:predict HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
            .encode() + b"{")
    start = time.perf_counter()
    answer = _raw(port, data, timeout=3)
    _json_error(answer, 413 if length < 2**63 else 400)
    assert time.perf_counter() - start < 2
    assert answer[0].startswith("HTTP/1.0") or answer[1]["connection"].lower() == "close"


def test_the_server_survived_and_logged_no_traceback(served):
    _, _, port, log_path = served
    with urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models/hagan:predict", data=PREVIEW), timeout=60) as r:
        assert r.status == 200
    log = log_path.read_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:3000]


def test_every_export_has_a_warmup_file_that_replays(served, tmp_path):
    """assets.extra/tf_serving_warmup_requests: one PredictRequest per signature, each of which
    runs (TF Serving fails the load otherwise), for plain and class-conditional models."""
    from hagan_tf.serving.registry import Servable
    from hagan_tf.serving.warmup import WARMUP_ASSET, read_warmup, replay_warmup

    base, _, _, log_path = served
    conditional = export_model(HAGAN(CFG.replace(num_classes=3)), str(tmp_path), "cond", 1)
    for path in (os.path.join(base, "hagan", "1"), conditional):
        assert 0 < os.path.getsize(os.path.join(path, WARMUP_ASSET)) < 10_000  # not 32^3 zeros
        servable = Servable("m", 1, path)
        requests = read_warmup(path)
        assert sorted(r.model_spec.signature_name for r in requests) == sorted(servable.functions)
        for request in requests:
            specs = servable.inputs[request.model_spec.signature_name]
            assert set(request.inputs) == set(specs)
            for key, proto in request.inputs.items():
                assert specs[key].shape.is_compatible_with(tf.make_ndarray(proto).shape)
        assert replay_warmup(servable) == len(requests) == 7
    assert re.search(r"hagan version 1: 7 warmup requests in", log_path.read_text())


def test_a_failing_warmup_request_fails_the_load_as_in_tf_serving(served, tmp_path):
    import shutil

    from tensorflow_serving.apis import prediction_log_pb2

    from hagan_tf.serving.registry import ModelRegistry
    from hagan_tf.serving.warmup import WARMUP_ASSET

    good = os.path.join(served[0], "hagan", "1")
    shutil.copytree(good, tmp_path / "hagan" / "1")
    shutil.copytree(good, tmp_path / "hagan" / "2")
    entry = prediction_log_pb2.PredictionLog()
    entry.predict_log.request.CopyFrom(_request("generate", z=np.zeros((1, 5), np.float32)))
    with tf.io.TFRecordWriter(str(tmp_path / "hagan" / "2" / WARMUP_ASSET)) as writer:
        writer.write(entry.SerializeToString())  # z of the wrong width
    registry = ModelRegistry(str(tmp_path))
    registry.refresh()
    assert registry.get("hagan").version == 1
    failed = registry.status("hagan", 2).model_version_status[0]
    assert failed.state == failed.END and "z" in failed.status.error_message
    unwarmed = ModelRegistry(str(tmp_path), warmup=False)  # hagan-serve --no-warmup
    unwarmed.refresh()
    assert unwarmed.get("hagan").version == 2


def test_an_odd_directory_name_does_not_stop_the_registry(served, tmp_path):
    """A version directory named "²" passes str.isdigit, and int() refuses it."""
    import shutil

    from hagan_tf.serving.registry import ModelRegistry

    shutil.copytree(os.path.join(served[0], "hagan", "1"), tmp_path / "hagan" / "1")
    shutil.copytree(os.path.join(served[0], "hagan", "1"), tmp_path / "other" / "3")
    registry = ModelRegistry(str(tmp_path), warmup=False)
    registry.refresh()
    (tmp_path / "hagan" / "\u00b2").mkdir()
    registry.refresh()  # the odd name is skipped or logged; what was served stays served
    assert registry.get("hagan").version == 1 and registry.get("other").version == 3


def test_version_listing_takes_ascii_digits_only(tmp_path):
    """hagan_tf.layout.versions: str.isdigit takes "²" (which int() refuses) and "١" (which
    int() reads as 1, a second version 1)."""
    from hagan_tf.layout import default_version, versions

    for name in ("1", "10", "\u00b2", "\u0661", "\u0661\u0662", "3a"):
        (tmp_path / name).mkdir()
    (tmp_path / "5").write_text("")  # a file, not a version
    assert versions(str(tmp_path)) == [1, 10]
    assert default_version(str(tmp_path), 3) == 11


def test_expect_100_continue_is_answered_before_the_body(served):
    """curl sends `Expect: 100-continue` with bodies over 1 KiB and waits a second for it."""
    _, _, port, _ = served
    head = (f"POST /v1/models/hagan:predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(PREVIEW)}"
            "\r\nExpect: 100-continue\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(head)
        assert s.recv(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(PREVIEW)
        assert s.recv(12) == b"HTTP/1.1 200"
