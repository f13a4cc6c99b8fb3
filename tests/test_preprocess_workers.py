"""The Beam workers without TensorFlow: their records, their remote copies, their timings."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from hagan_tf.data import records
from hagan_tf.data.records import decode_example, read_manifest
from hagan_tf.data.synthetic import phantom_hu
from hagan_tf.preprocess import tfrecord
from hagan_tf.preprocess.beam import main, plan, shard_name
from test_preprocess import save_scan
from test_readers import write_dicom_series, write_itk


@pytest.mark.parametrize("dtype, shape, label, fold, sid", [
    ("float16", (4, 3, 2), -1, -1, "ct_a"),
    ("float32", (2, 5, 3), 7, 2, "PAT 1_1.2.840.113619.2.55"),
    ("float16", (3, 3, 3), 0, 4, "süjet-ø"),
])
def test_records_equal_the_records_modules(dtype, shape, label, fold, sid):
    vol = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    mine = tfrecord.encode_example(vol[..., None], sid, label, fold, dtype)
    theirs = records.encode_example(vol, sid, label, fold, dtype)
    assert tf.train.Example.FromString(mine) == tf.train.Example.FromString(theirs)
    decoded = decode_example(mine)
    np.testing.assert_array_equal(decoded["volume"][..., 0], vol.astype(dtype).astype(np.float32))
    assert decoded["subject_id"].decode() == sid and decoded["label"] == label


def test_bad_volumes_are_refused_as_by_the_records_module():
    for bad in (np.full((2, 2, 2), 1e6), np.zeros((2, 2))):
        with pytest.raises(ValueError) as mine:
            tfrecord.encode_example(bad, "x")
        with pytest.raises(ValueError) as theirs:
            records.encode_example(bad, "x")
        assert str(mine.value) == str(theirs.value)


def test_framing_is_tfrecords_byte_for_byte(tmp_path):
    payloads = [b"", b"x", os.urandom(70000)]
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as w:
        for p in payloads:
            w.write(p)
    buf = io.BytesIO()
    for p in payloads:
        tfrecord.write_record(buf, p)
    assert buf.getvalue() == (tmp_path / "tf.tfrecord").read_bytes()
    # a record written in parts (head, voxels; the voxels over several CRC chunks) is the same
    vol = np.random.default_rng(1).uniform(-1, 1, (40, 300, 200)).astype(np.float32)
    head, data = tfrecord.encode_example_parts(vol, "big", 1, 2, "float32")
    assert len(data) > 2 * tfrecord.CRC_CHUNK
    whole, parts = io.BytesIO(), io.BytesIO()
    tfrecord.write_record(whole, tfrecord.encode_example(vol, "big", 1, 2, "float32"))
    tfrecord.write_record(parts, head, data)
    assert parts.getvalue() == whole.getvalue()
    (tmp_path / "big.tfrecord").write_bytes(parts.getvalue())
    (raw,) = list(tf.data.TFRecordDataset(str(tmp_path / "big.tfrecord")))
    np.testing.assert_array_equal(decode_example(raw.numpy())["volume"][..., 0], vol)
    assert [shard_name(i, n) for i, n in ((0, 1), (3, 16), (99999, 100000))] == \
        [records.shard_name(i, n) for i, n in ((0, 1), (3, 16), (99999, 100000))]


def test_the_worker_module_imports_no_tensorflow():
    code = ("import sys, hagan_tf.preprocess.beam, hagan_tf.preprocess.readers; "
            "sys.exit('tensorflow' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_remote_series_and_header_files_are_copied_then_removed(tmp_path, monkeypatch):
    """file:// stands for gs://: a series' files, and an .mhd's data file, come along."""
    import hagan_tf.preprocess.workers as beam_mod  # the workers' code
    from hagan_tf.preprocess import preprocess_file
    from hagan_tf.preprocess.readers import DicomSeries

    vol = phantom_hu((12, 16, 14), 0.7, np.random.default_rng(0)).round()
    uid, files = write_dicom_series(tmp_path / "dcm", vol)
    write_itk(tmp_path / "ct.mhd", vol, np.eye(3), (1, 1, 1))
    assert sorted(os.listdir(tmp_path)) == ["ct.mhd", "ct.zraw", "dcm"]
    series = DicomSeries(uid, tuple(f"file://{f}" for f in files.values()), "dcm",
                         f"file://{tmp_path}/dcm")
    seen = []

    def spy(source, **kw):
        folder = source.folder if isinstance(source, DicomSeries) else os.path.dirname(source)
        seen.append(sorted(os.listdir(os.path.dirname(folder) if isinstance(
            source, DicomSeries) else folder)))
        return preprocess_file(source, **kw)

    monkeypatch.setattr(beam_mod, "preprocess_file", spy)
    out = tmp_path / "out"
    out.mkdir()
    entries = plan([series, f"file://{tmp_path}/ct.mhd"])
    results = list(beam_mod.WriteShard(str(out), 1, size=8, min_extent=1).process((0, entries)))
    assert seen == [["ct.mhd", "ct.zraw"], ["series"]]  # one scan's copies at a time
    rows = [r for r in results if isinstance(r, dict)]
    assert sorted(r["subject_id"] for r in rows) == ["ct", "dcm"], results
    got = {r["subject_id"]: r for r in rows}["dcm"]
    assert got["series_uid"] == uid and got["source"] == f"file://{tmp_path}/dcm"


def test_summary_times_each_stage_and_the_direct_runner_uses_threads(tmp_path, monkeypatch,
                                                                     capsys):
    import hagan_tf.preprocess.beam as beam_mod

    (tmp_path / "in").mkdir()
    for i in range(3):
        save_scan(tmp_path / "in" / f"s{i}.nii.gz",
                  phantom_hu((40, 48, 36), 0.7, np.random.default_rng(i)))
    monkeypatch.setattr(beam_mod.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(beam_mod, "_memory_bytes", lambda: 5 * 2 ** 30)  # room for 2 workers
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--size", "32"]
    assert main(args) == 0
    assert "(DirectRunner, 2 threads)" in capsys.readouterr().err
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    stages = summary["stage_seconds"]
    assert set(stages) == {"read", "normalise", "resample", "write"}
    assert all(v >= 0 for v in stages.values()) and sum(stages.values()) > 0
    assert len(read_manifest(str(tmp_path / "out"))) == 3
    # Beam options given by the user are left alone
    assert main(args + ["--overwrite", "--direct_num_workers", "1"]) == 0
    assert "(DirectRunner)" in capsys.readouterr().err


def test_worker_processes_write_the_same_records(tmp_path, capsys):
    """Separate worker processes (as on a cluster) unpickle and run the TF-free DoFns."""
    scans = tmp_path / "in"
    scans.mkdir()
    for i in range(2):
        save_scan(scans / f"s{i}.nii.gz", phantom_hu((40, 48, 36), 0.7, np.random.default_rng(i)))
    assert main(["--input", str(scans), "--output", str(tmp_path / "out"), "--size", "32",
                 "--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]) == 0
    assert "written: 2, failed: 0" in capsys.readouterr().out
    from hagan_tf.preprocess import preprocess_file
    from test_preprocess_pipeline import _records

    for _, rec in _records(str(tmp_path / "out")):
        sid = rec["subject_id"].decode()
        expected, _ = preprocess_file(str(scans / f"{sid}.nii.gz"), 32)
        np.testing.assert_array_equal(rec["volume"][..., 0],
                                      expected.astype(np.float16).astype(np.float32))
