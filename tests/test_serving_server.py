"""hagan-serve as a subprocess on free loopback ports: gRPC and REST round trips, bad requests,
concurrency, new versions; and the hagan-sample / hagan-encode clients against it."""

import argparse
import csv
import json
import os
import re
import shutil
import socket
import struct
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
from google.protobuf import wrappers_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from hagan_tf import HAGAN, HAGANConfig
from hagan_tf.serving import GRPC_OPTIONS, ServingError
from hagan_tf.serving.client import Client
from hagan_tf.serving.encode_cli import encode_main
from hagan_tf.serving.sample_cli import sample_main
from hagan_tf.serving.export import export_model, seed_latents

CFG = HAGANConfig(size=32, width=0.125, latent_dim=16, spacing=1.5)
MAX_BYTES = 4 << 20  # the server's --max-request-bytes in these tests


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(gan, model_base, grpc_port, rest_port) of a hagan-serve subprocess."""
    root = tmp_path_factory.mktemp("serve")
    base = str(root / "models")
    gan = HAGAN(CFG)
    export_model(gan, base, "hagan", 1)
    script = os.path.join(os.path.dirname(sys.executable), "hagan-serve")
    cmd = ([script] if os.path.exists(script) else [sys.executable, "-m", "hagan_tf.serving.server"])
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        cmd + ["--model-base", base, "--port", "0", "--rest-port", "0", "--poll-seconds", "0.5",
               "--max-request-bytes", str(MAX_BYTES), "--max-rest-bytes", str(MAX_BYTES),
               "--max-batch", "8"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()  # printed once both ports are bound and models loaded
        m = re.search(r"gRPC on 127\.0\.0\.1:(\d+), REST on http://127\.0\.0\.1:(\d+)", line)
        assert m, f"unexpected first line {line!r}; log:\n{open(root / 'server.log').read()}"
        yield gan, base, int(m[1]), int(m[2])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == 0  # SIGTERM is a clean shutdown


@pytest.fixture(scope="module")
def stubs(served):
    channel = grpc.insecure_channel(f"127.0.0.1:{served[2]}", options=GRPC_OPTIONS)
    yield (prediction_service_pb2_grpc.PredictionServiceStub(channel),
           model_service_pb2_grpc.ModelServiceStub(channel))
    channel.close()


def _predict_request(signature, model="hagan", version=None, **inputs):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.CopyFrom(wrappers_pb2.Int64Value(value=version))
    for k, v in inputs.items():
        request.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    return request


def _rest(port, path, body=None, raw=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_grpc_round_trip(served, stubs):
    gan, _, _, _ = served
    predictions, models = stubs
    z = gan.sample_z(2, seed=0)
    response = predictions.Predict(_predict_request("generate", z=z), timeout=120)
    assert response.model_spec.name == "hagan" and response.model_spec.version.value == 1
    volume = tf.make_ndarray(response.outputs["volume"])
    np.testing.assert_allclose(volume, np.asarray(gan.generate(z)), atol=1e-5)

    response = predictions.Predict(_predict_request("encode", volume=volume), timeout=120)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["z"]), gan.encode(volume).numpy(),
                               rtol=1e-4, atol=1e-4)

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "hagan"
    metadata = predictions.GetModelMetadata(request, timeout=60)
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    metadata.metadata["signature_def"].Unpack(signature_defs)
    encode = signature_defs.signature_def["encode"]
    assert [d.size for d in encode.inputs["volume"].tensor_shape.dim] == [-1, 32, 32, 32, 1]
    assert {"generate", "generate_from_seed", "generate_preview", "reconstruct", "config",
            "serving_default"} <= set(signature_defs.signature_def)

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "hagan"
    status = models.GetModelStatus(request, timeout=60).model_version_status
    assert [(s.version, s.state) for s in status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]


def test_rest_round_trip_in_row_and_columnar_formats(served):
    gan, _, _, port = served
    z = gan.sample_z(2, seed=1)
    expected = np.asarray(gan.generate(z))
    code, reply = _rest(port, "/v1/models/hagan:predict", {"instances": z.tolist()})
    assert code == 200
    np.testing.assert_allclose(np.array(reply["predictions"], np.float32), expected, atol=1e-5)
    code, reply = _rest(port, "/v1/models/hagan/versions/1:predict",
                        {"signature_name": "generate", "inputs": {"z": z.tolist()}})
    assert code == 200
    np.testing.assert_allclose(np.array(reply["outputs"], np.float32), expected, atol=1e-5)

    code, reply = _rest(port, "/v1/models/hagan:predict",
                        {"signature_name": "encode", "instances": [{"volume": v} for v in expected.tolist()]})
    assert code == 200
    np.testing.assert_allclose(np.array(reply["predictions"]), gan.encode(expected).numpy(),
                               rtol=1e-4, atol=1e-4)

    assert _rest(port, "/v1/models/hagan") == (200, {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
    code, reply = _rest(port, "/v1/models/hagan/versions/1/metadata")
    assert code == 200 and reply["model_spec"]["version"] == "1"
    seed = reply["metadata"]["signature_def"]["signature_def"]["generate_from_seed"]
    assert seed["inputs"]["seed"]["dtype"] == "DT_INT64"


def test_client_module_over_both_protocols(served):
    gan, _, grpc_port, rest_port = served
    z = gan.sample_z(1, seed=2)
    for address, rest in ((f"127.0.0.1:{grpc_port}", False), (f"http://127.0.0.1:{rest_port}", True)):
        with Client(address, rest=rest) as client:
            assert client.config()["spacing"] == 1.5
            assert client.status() == [{"version": 1, "state": "AVAILABLE"}]
            assert client.metadata()["encode"]["outputs"]["z"] == ("DT_FLOAT", [-1, 16])
            np.testing.assert_allclose(client.preview(z), gan.generator.preview(z).numpy(), atol=1e-5)
            a, b = client.generate_from_seed([4, 5]), client.generate_from_seed([4, 5])
            np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(client.reconstruct(a[:1]),
                                       np.asarray(gan.generate(gan.encode(a[:1]))), atol=1e-4)


def _grpc_code(call):
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_bad_requests_get_the_right_errors_and_the_server_keeps_serving(served, stubs):
    gan, _, _, port = served
    predict = stubs[0].Predict
    z = gan.sample_z(1, seed=3)
    grpc_cases = {
        "unknown model": (_predict_request("generate", model="nope", z=z), grpc.StatusCode.NOT_FOUND),
        "unknown version": (_predict_request("generate", version=9, z=z), grpc.StatusCode.NOT_FOUND),
        "unknown signature": (_predict_request("dream", z=z), grpc.StatusCode.FAILED_PRECONDITION),
        "wrong dtype": (_predict_request("generate", z=z.astype(np.float64)),
                        grpc.StatusCode.INVALID_ARGUMENT),
        "wrong shape": (_predict_request("generate", z=z[:, :5]), grpc.StatusCode.INVALID_ARGUMENT),
        "missing input": (_predict_request("generate"), grpc.StatusCode.INVALID_ARGUMENT),
        "extra input": (_predict_request("generate", z=z, w=z), grpc.StatusCode.INVALID_ARGUMENT),
        "batch too big": (_predict_request("generate_from_seed", seed=np.arange(9, dtype=np.int64)),
                          grpc.StatusCode.INVALID_ARGUMENT),
        "oversized message": (_predict_request("generate", z=np.zeros((MAX_BYTES // 64 + 1, 16),
                                                                      np.float32)),
                              grpc.StatusCode.RESOURCE_EXHAUSTED),
    }
    for name, (request, code) in grpc_cases.items():
        assert _grpc_code(lambda: predict(request, timeout=60)) == code, name
    corrupt = _predict_request("generate", z=z)
    corrupt.inputs["z"].tensor_content = b"\x00" * 7  # bytes that are not 16 floats
    assert _grpc_code(lambda: predict(corrupt, timeout=60)) == grpc.StatusCode.INVALID_ARGUMENT
    huge = _predict_request("generate", z=z)  # a declared shape that would need 64 TB
    huge.inputs["z"].ClearField("tensor_content")
    huge.inputs["z"].tensor_shape.dim[0].size = 10**12
    assert _grpc_code(lambda: predict(huge, timeout=60)) == grpc.StatusCode.INVALID_ARGUMENT
    negative = _predict_request("generate", z=z)
    negative.inputs["z"].tensor_shape.dim[0].size = -1
    assert _grpc_code(lambda: predict(negative, timeout=60)) == grpc.StatusCode.INVALID_ARGUMENT

    rest_cases = [
        ("unknown model", "/v1/models/nope:predict", {"instances": z.tolist()}, None, 404),
        ("unknown version", "/v1/models/hagan/versions/9:predict", {"instances": z.tolist()}, None, 404),
        ("unknown signature", "/v1/models/hagan:predict",
         {"signature_name": "dream", "instances": z.tolist()}, None, 400),
        ("wrong dtype", "/v1/models/hagan:predict", {"instances": [["a"] * 16]}, None, 400),
        ("float seed", "/v1/models/hagan:predict",
         {"signature_name": "generate_from_seed", "inputs": {"seed": [1.5]}}, None, 400),
        ("wrong shape", "/v1/models/hagan:predict", {"instances": [[0.0] * 5]}, None, 400),
        ("ragged", "/v1/models/hagan:predict", {"instances": [[0.0] * 16, [0.0] * 3]}, None, 400),
        ("missing input", "/v1/models/hagan:predict", {"inputs": {}}, None, 400),
        ("no instances", "/v1/models/hagan:predict", {"signature_name": "generate"}, None, 400),
        ("garbage JSON", "/v1/models/hagan:predict", None, b"{not json", 400),
        ("not an object", "/v1/models/hagan:predict", None, b"[1, 2]", 400),
        ("oversized body", "/v1/models/hagan:predict", None, b" " * (MAX_BYTES + 1), 413),
        ("unknown path", "/v2/anything", {"instances": []}, None, 404),
        ("classify", "/v1/models/hagan:classify", {"examples": []}, None, 501),
    ]
    for name, path, body, raw, code in rest_cases:
        status, reply = _rest(port, path, body, raw)
        assert status == code, (name, reply)
        assert isinstance(reply["error"], str) and reply["error"], name
    assert _rest(port, "/v1/models/nope")[0] == 404
    assert _rest(port, "/v1/models/hagan/versions/9") == (
        404, {"error": "Could not find version 9 of model 'hagan'"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models/hagan", method="DELETE"), timeout=60)
    assert e.value.code == 405 and "error" in json.loads(e.value.read())
    assert _rest(port, "/v1/models/nope/metadata")[0] == 404

    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:  # a client that dies
        s.sendall(b"POST /v1/models/hagan:predict HTTP/1.1\r\nContent-Length: 100000\r\n\r\n{")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset

    # still serving, on both protocols
    response = predict(_predict_request("generate_preview", z=z), timeout=60)
    assert tf.make_ndarray(response.outputs["volume"]).shape == (1, 8, 8, 8, 1)
    assert _rest(port, "/v1/models/hagan:predict",
                 {"signature_name": "generate_preview", "instances": z.tolist()})[0] == 200
    with open(os.path.join(os.path.dirname(served[1]), "server.log")) as f:
        assert "Traceback" not in f.read()  # a bad request or a vanished client is no crash


def test_eight_concurrent_clients_without_errors(served):
    gan, _, grpc_port, rest_port = served
    z = gan.sample_z(1, seed=4)
    expected = gan.generator.preview(z).numpy()
    errors, results = [], []

    def worker(i):
        rest = i % 2 == 1
        try:
            with Client(f"127.0.0.1:{rest_port if rest else grpc_port}", rest=rest) as client:
                for j in range(20):
                    if j % 5 == 4:
                        results.append(client.generate_from_seed([i]).shape)
                    else:
                        np.testing.assert_allclose(client.preview(z), expected, atol=1e-5)
                        results.append(expected.shape)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert errors == [] and len(results) == 160


def _wait_for(fn, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError("timed out")


def test_new_versions_and_models_are_picked_up_without_restart(served, tmp_path):
    gan, base, grpc_port, rest_port = served

    def publish(name, version):  # what hagan-export does: write aside, rename into place
        staging = os.path.join(base, name, f".tmp-{version}")
        shutil.copytree(os.path.join(base, "hagan", "1"), staging)
        os.rename(staging, os.path.join(base, name, str(version)))

    os.makedirs(os.path.join(base, "other"))
    publish("other", 4)
    client = Client(f"127.0.0.1:{grpc_port}", model="other")
    _wait_for(lambda: _rest(rest_port, "/v1/models/other")[0] == 200)
    publish("other", 5)
    _wait_for(lambda: client.status()[0]["version"] == 5)
    assert _rest(rest_port, "/v1/models/other/versions/4:predict",
                 {"signature_name": "generate_preview", "instances": [[0.0] * 16]})[0] == 404

    broken = os.path.join(base, "other", "6")
    os.makedirs(broken)
    with open(os.path.join(broken, "saved_model.pb"), "wb") as f:
        f.write(b"not a saved model")
    states = _wait_for(lambda: (s := client.status()) and len(s) == 2 and s)
    assert states == [{"version": 6, "state": "END"}, {"version": 5, "state": "AVAILABLE"}]
    z = gan.sample_z(1, seed=6)
    np.testing.assert_allclose(client.generate(z), np.asarray(gan.generate(z)), atol=1e-5)
    client.close()


def test_a_broken_newest_version_falls_back_at_once_and_a_taken_port_is_refused(served, tmp_path):
    from hagan_tf.serving.server import Server

    base = tmp_path / "models"
    shutil.copytree(os.path.join(served[1], "hagan", "1"), base / "hagan" / "1")
    (base / "hagan" / "2").mkdir()
    (base / "hagan" / "2" / "saved_model.pb").write_bytes(b"not a saved model")
    with Server(str(base), port=0, rest_port=None) as server:
        assert server.registry.get("hagan").version == 1  # not "none yet" until the next poll
        with pytest.raises(OSError, match="cannot bind gRPC"):  # no SO_REUSEPORT sharing
            Server(str(base), port=server.port, rest_port=None)


def test_hagan_sample_writes_nifti_montage_and_is_reproducible(served, tmp_path):
    import nibabel as nib

    gan, _, grpc_port, rest_port = served
    out_grpc, out_rest = str(tmp_path / "grpc"), str(tmp_path / "rest")
    assert sample_main(["--server", f"127.0.0.1:{grpc_port}", "-n", "3", "--seed", "10",
                        "--batch", "2", "--out", out_grpc]) == 0
    assert sample_main(["--server", f"127.0.0.1:{rest_port}", "--rest", "-n", "3", "--seed", "10",
                        "--out", out_rest]) == 0
    expected = np.asarray(gan.generate(seed_latents([10, 11, 12], CFG.latent_dim)))
    for i, seed in enumerate((10, 11, 12)):
        a = nib.load(os.path.join(out_grpc, f"sample_{seed}.nii.gz"))
        b = nib.load(os.path.join(out_rest, f"sample_{seed}.nii.gz"))
        np.testing.assert_allclose(np.diag(a.affine), [1.5, 1.5, 1.5, 1.0])
        np.testing.assert_allclose(a.get_fdata(), b.get_fdata(), atol=1e-5)  # other batching
        np.testing.assert_allclose(a.get_fdata(), expected[i, ..., 0].transpose(2, 1, 0), atol=1e-5)
    assert os.path.getsize(os.path.join(out_grpc, "montage.png")) > 1000
    with open(os.path.join(out_grpc, "samples.csv")) as f:
        assert [r["seed"] for r in csv.DictReader(f)] == ["10", "11", "12"]


def test_hagan_sample_files_are_as_before_and_run_streams_the_same(served, tmp_path):
    """From a server, each file is the served volume as save_nifti wrote it before (nib.save of
    the transposed array), byte for byte. --run (the same weights in this process, each slab
    written into its file as it is decoded) gives the same volumes to 1e-5 (the served decode
    is traced, this one eager), as .nii.gz or .nii, with the same header."""
    import nibabel as nib

    from hagan_tf.rundir import save_model, write_config

    gan, _, grpc_port, _ = served
    run = str(tmp_path / "run")
    write_config(run, CFG)
    save_model(run, gan, 0)
    out_server, out_run, out_nii = (str(tmp_path / d) for d in ("server", "run_gz", "run_nii"))
    assert sample_main(["--server", f"127.0.0.1:{grpc_port}", "-n", "2", "--seed", "3",
                        "--out", out_server]) == 0
    assert sample_main(["--run", run, "-n", "2", "--seed", "3", "--batch", "1",
                        "--out", out_run]) == 0
    assert sample_main(["--run", run, "-n", "2", "--seed", "3", "--format", "nii",
                        "--montage-max", "1", "--out", out_nii]) == 0
    with Client(f"127.0.0.1:{grpc_port}") as client:
        served_volumes = client.generate_from_seed([3, 4])
    for i, seed in enumerate((3, 4)):
        img = nib.Nifti1Image(np.ascontiguousarray(served_volumes[i, ..., 0].transpose(2, 1, 0)),
                              np.diag([1.5, 1.5, 1.5, 1.0]))
        img.header.set_xyzt_units("mm")
        before = str(tmp_path / f"before_{seed}.nii.gz")
        nib.save(img, before)
        with open(before, "rb") as f, open(os.path.join(out_server, f"sample_{seed}.nii.gz"), "rb") as g:
            assert f.read() == g.read()
        ran = nib.load(os.path.join(out_run, f"sample_{seed}.nii.gz"))
        ran_nii = nib.load(os.path.join(out_nii, f"sample_{seed}.nii"))
        assert ran.header == nib.load(before).header == ran_nii.header
        np.testing.assert_allclose(ran.get_fdata(), img.get_fdata(), atol=1e-5)
        # another batch (2 against 1): equal to float32 rounding, as the README says
        np.testing.assert_allclose(ran_nii.get_fdata(), ran.get_fdata(), atol=1e-5)
    assert os.path.getsize(os.path.join(out_run, "montage.png")) > 1000
    with open(os.path.join(out_nii, "samples.csv")) as f:
        assert [r["file"] for r in csv.DictReader(f)] == ["sample_3.nii", "sample_4.nii"]


def test_hagan_sample_refuses_bad_arguments(served, tmp_path, capsys):
    _, _, grpc_port, _ = served
    server = f"127.0.0.1:{grpc_port}"
    for argv, message in [
        (["--server", "nohost", "--out", str(tmp_path)], "HOST:PORT"),
        (["--server", server, "-n", "0", "--out", str(tmp_path)], "-n must be >= 1"),
        (["--server", server, "--label", "1", "--out", str(tmp_path)], "not class-conditional"),
    ]:
        with pytest.raises(SystemExit) as e:
            sample_main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert sample_main(["--server", server, "--model", "nope", "--out", str(tmp_path)]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    for argv, message in [
        (["--server", server, "--montage-max", "-1", "--out", str(tmp_path)], "--montage-max must be >= 0"),
        (["--server", server, "--out", str(tmp_path / "a_file" / "x")], "cannot write --out"),
    ]:
        with pytest.raises(SystemExit) as e:
            sample_main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert sample_main(["--server", server, "-n", "1", "--montage-max", "0",
                        "--out", str(tmp_path / "none")]) == 0
    assert sorted(os.listdir(tmp_path / "none")) == ["sample_0.nii.gz", "samples.csv"]
    assert "wrote 1 samples (1.5 mm voxels) to" in capsys.readouterr().out


def test_rest_client_errors_say_what_went_wrong(served):
    """The gRPC port given with --rest, and a server that takes a request but never answers."""
    _, _, grpc_port, _ = served
    with pytest.raises(ServingError, match="is this the gRPC port"):
        Client(f"127.0.0.1:{grpc_port}", rest=True).config()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        with pytest.raises(ServingError, match=r"no answer from .* within 0.5 s \(raise --timeout\)") as e:
            Client(f"127.0.0.1:{silent.getsockname()[1]}", rest=True, timeout=0.5).config()
        assert e.value.code == "DEADLINE_EXCEEDED"  # hagan-encode skips that batch, not the job
    finally:
        silent.close()


def test_hagan_encode_preprocesses_scans_and_skips_bad_ones(served, tmp_path, capsys):
    import nibabel as nib

    from hagan_tf.data.synthetic import phantom_hu
    from hagan_tf.preprocess.transform import preprocess_file

    gan, _, grpc_port, rest_port = served
    rng = np.random.default_rng(0)
    scans = []
    for i in range(3):
        path = str(tmp_path / f"scan{i}.nii.gz")
        nib.save(nib.Nifti1Image(phantom_hu((32, 32, 32), 0.8 + 0.1 * i, rng).astype(np.float32),
                                 np.eye(4)), path)
        scans.append(path)
    bad = str(tmp_path / "bad.nii.gz")
    with open(bad, "wb") as f:
        f.write(b"garbage")
    expected = gan.encode(np.stack([preprocess_file(p, 32)[0][..., None] for p in scans])).numpy()

    for rest, port in ((False, grpc_port), (True, rest_port)):
        out = str(tmp_path / f"emb_{rest}.csv")
        argv = ["--server", f"127.0.0.1:{port}", scans[0], bad, scans[1], scans[2], "--batch", "2",
                "--out", out] + (["--rest"] if rest else [])
        assert encode_main(argv) == 1  # one scan failed; the others are written
        assert "skipped " + bad in capsys.readouterr().err
        with open(out) as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["scan"] + [f"z{i}" for i in range(16)]
        assert [r[0] for r in rows[1:]] == scans
        np.testing.assert_allclose(np.array([r[1:] for r in rows[1:]], np.float32), expected,
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit) as e:  # --out is a directory
        encode_main(["--server", f"127.0.0.1:{grpc_port}", scans[0], "--out", str(tmp_path)])
    assert e.value.code == 2 and "cannot write --out" in capsys.readouterr().err


def test_hagan_encode_takes_the_training_datas_transform(tmp_path):
    """Scans must be encoded as the model's training data was preprocessed (--like DATA_DIR)."""
    from hagan_tf.serving.encode_cli import encode_transform

    def settings(*argv):
        parser = argparse.ArgumentParser()
        for flag in ("--like", "--modality", "--percentile", "--isotropic", "--min-extent"):
            parser.add_argument(flag, type=str if flag in ("--like", "--modality") else float)
        parser.add_argument("--window", type=float, nargs=2)
        return encode_transform(parser.parse_args(argv))

    assert settings() == {"modality": "ct", "window": (-1024.0, 600.0), "percentile": 99.9,
                          "isotropic": None, "min_extent": None}
    (tmp_path / "summary.json").write_text(json.dumps(
        {"modality": "mri", "window": None, "percentile": 99.5, "isotropic": 1.0, "min_extent": 16}))
    assert settings("--like", str(tmp_path)) == {"modality": "mri", "window": (-1024.0, 600.0),
                                                 "percentile": 99.5, "isotropic": 1.0, "min_extent": 16}
    assert settings("--like", str(tmp_path), "--isotropic", "2")["isotropic"] == 2.0  # options win
    with pytest.raises(ValueError, match="no summary.json"):
        settings("--like", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="LOW must be below HIGH"):
        settings("--window", "600", "-1024")


def test_rest_parses_at_most_max_concurrent_bodies_at_once():
    """The bound that keeps N large JSON bodies (~7x their size once parsed) out of memory;
    bodies are read concurrently (a stalled upload must not hold a slot)."""
    from hagan_tf.serving.rest_http import RestServer

    class SlowApp:  # stands in for RestApp: counts the bodies being handled at once
        def __init__(self):
            self.lock, self.now, self.most = threading.Lock(), 0, 0

        def handle(self, method, path, body):
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            time.sleep(0.2)
            with self.lock:
                self.now -= 1
            return 200, {"bytes": len(body or b"")}

    app = SlowApp()
    server = RestServer(("127.0.0.1", 0), app, max_body=1 << 20, max_concurrent=2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        answers = []
        clients = [threading.Thread(target=lambda: answers.append(
            _rest(port, "/v1/models/m:predict", raw=b"x" * 1000))) for _ in range(6)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(timeout=60)
        assert answers == [(200, {"bytes": 1000})] * 6
        assert app.most == 2  # six clients at once, never more than two bodies held
        assert _rest(port, "/v1/models/m:predict", raw=b"x" * (2 << 20))[0] == 413
        assert app.most == 2 and app.now == 0
    finally:
        server.shutdown()
        server.server_close()


def test_a_batch_runs_in_groups_of_at_most_run_voxels_with_the_same_answer(served):
    """16 volumes at 256^3 in one execution would need ~16x the memory of one."""
    from hagan_tf.serving.server import ModelRegistry, Predictor

    gan, base, _, _ = served
    registry = ModelRegistry(base)
    registry.refresh()
    servable = registry.get("hagan")
    calls = []
    for name in ("generate", "encode"):
        def spy(_f=servable.functions[name], **inputs):
            calls.append(len(next(iter(inputs.values()))))
            return _f(**inputs)
        spy.structured_outputs = servable.functions[name].structured_outputs
        servable.functions[name] = spy
    assert servable.sample_voxels["generate"] == 32**3 and servable.sample_voxels["config"] is None
    z = gan.sample_z(5, seed=3)
    whole = Predictor(registry, max_batch=8).predict(servable, "generate", {"z": z})["volume"]
    assert calls == [5]
    grouped = Predictor(registry, max_batch=8, run_voxels=2 * 32**3 + 1)
    np.testing.assert_allclose(grouped.predict(servable, "generate", {"z": z})["volume"], whole,
                               atol=1e-5)  # the kernels may sum in another order per batch size
    assert calls[1:] == [2, 2, 1]
    codes = grouped.predict(servable, "encode", {"volume": whole})["z"]
    assert calls[4:] == [2, 2, 1] and codes.shape == (5, 16)
    np.testing.assert_allclose(codes, gan.encode(whole).numpy(), atol=1e-5)
    assert grouped.predict(servable, "generate", {"z": z[:0]})["volume"].shape == (0, 32, 32, 32, 1)
    assert b"size: 32" in grouped.predict(servable, "config", {"format": np.array(b"yaml")})["config"].item()


def test_old_import_paths_and_console_scripts_still_work():
    """server.py and client.py were split (issue 23); scripts and users import the old names."""
    import importlib.metadata

    from hagan_tf.serving import client, encode_cli, predictor, registry, sample_cli, server

    assert client.sample_main is sample_cli.sample_main is sample_main
    assert client.encode_main is encode_cli.encode_main is encode_main
    assert client.encode_transform is encode_cli.encode_transform
    assert server.ModelRegistry is registry.ModelRegistry and server.Predictor is predictor.Predictor
    assert server.RUN_VOXELS == predictor.RUN_VOXELS
    with pytest.raises(AttributeError):
        client.no_such_name  # noqa: B018
    scripts = {e.name: e for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts["hagan-serve"].load() is server.main
    assert scripts["hagan-sample"].load() is sample_main
    assert scripts["hagan-encode"].load() is encode_main


def test_requests_carry_at_most_two_256_cubed_volumes_unless_told():
    from hagan_tf.serving.client import request_batch

    assert [request_batch(None, s) for s in (32, 128, 256, 512)] == [4, 4, 2, 1]
    assert request_batch(3, 512) == 3  # --batch wins


def test_hagan_encode_reads_multiframe_dicom_as_hagan_preprocess_does(served, tmp_path):
    """An Enhanced CT file (frames shuffled, a rescale per frame) beside a truncated one: one
    row, labelled by the file and equal to encoding the same phantom from NIfTI; the cut file
    is reported and skipped."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_dicom_multiframe import write_enhanced_ct
    from test_readers import phantom, write_nifti

    from hagan_tf.preprocess.transform import preprocess_file

    gan, _, grpc_port, _ = served
    vol = phantom(seed=1)
    good = tmp_path / "dicom" / "enhanced" / "IM0001"
    write_enhanced_ct(good, vol, per_frame_rescale=True, shuffle_seed=4)
    cut = tmp_path / "dicom" / "cut" / "IM0001"
    write_enhanced_ct(cut, vol)
    cut.write_bytes(cut.read_bytes()[:-3000])
    nifti = write_nifti(tmp_path / "one.nii.gz", vol)
    out = str(tmp_path / "emb.csv")
    assert encode_main(["--server", f"127.0.0.1:{grpc_port}", str(tmp_path / "dicom"),
                        "--out", out]) == 1  # a scan failed
    with open(out) as f:
        rows = list(csv.reader(f))[1:]
    assert [r[0] for r in rows] == [str(good)]
    expected = gan.encode(preprocess_file(nifti, 32)[0][None, ..., None]).numpy()[0]
    assert np.abs(np.asarray(rows[0][1:], np.float32) - expected).max() <= 1e-4


def test_hagan_encode_reads_dicom_series_as_hagan_preprocess_does(served, tmp_path, capsys):
    """A folder with two DICOM series and a NIfTI file: one row per scan, each series labelled
    by folder and subject id, equal to encoding the same phantoms from NIfTI."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_readers import phantom, write_dicom_series, write_nifti

    from hagan_tf.preprocess.transform import preprocess_file

    gan, _, grpc_port, _ = served
    folder = tmp_path / "dicom"
    vols = [phantom(seed=1), phantom(seed=2)]
    for i, vol in enumerate(vols):
        write_dicom_series(folder, vol, patient=f"P{i}", shuffle_seed=i)
    nifti = write_nifti(tmp_path / "one.nii.gz", vols[0])
    out = str(tmp_path / "emb.csv")
    assert encode_main(["--server", f"127.0.0.1:{grpc_port}", str(folder), nifti,
                        "--out", out]) == 0
    with open(out) as f:
        rows = list(csv.reader(f))[1:]
    labels = [r[0] for r in rows]
    assert len(rows) == 3 and nifti in labels
    assert sorted(label.split(":")[0] for label in labels if label != nifti) == [str(folder)] * 2
    expected = {nifti: gan.encode(preprocess_file(nifti, 32)[0][None, ..., None]).numpy()[0]}
    for label, row in zip(labels, rows):
        if label != nifti:  # the P0 series is the same phantom as one.nii.gz
            z = np.asarray(row[1:], np.float32)
            match = np.abs(z - expected[nifti]).max() <= 1e-4
            assert match == label.split(":")[1].startswith("P0"), label
