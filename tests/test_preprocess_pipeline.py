"""The Beam job on the DirectRunner: good scans mixed with every kind of bad input."""

import collections
import json
import os
import random
import runpy
import sys

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from nibabel.orientations import axcodes2ornt, ornt_transform

from hagan_tf.data.pipeline import make_dataset
from hagan_tf.data.records import decode_example, read_manifest, shard_paths
from hagan_tf.data.synthetic import phantom_hu
from hagan_tf.preprocess import preprocess_file
from hagan_tf.preprocess.beam import DEAD_LETTER, main, plan, read_labels
from test_preprocess import _bad_files, save_scan

S = 32
GOOD = ["ct_a", "ct_b", "ct_c", "ct_blank", "ct_flipped", "ct_oblique"]


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    scans = root / "scans"
    (scans / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    c, s = np.cos(0.2), np.sin(0.2)
    oblique = np.array([[c, -s, 0, 5], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    for name in GOOD:
        vol = phantom_hu((40, 48, 36), rng.uniform(0.6, 0.9), rng)
        if name == "ct_blank":
            vol[:4], vol[-3:] = -2048.0, -1024.0
        affine = oblique @ np.diag([0.8, 0.8, 1.2, 1]) if name == "ct_oblique" else None
        path = save_scan(scans / f"{name}.nii.gz", vol, affine=affine)
        if name == "ct_flipped":  # the same image stored with axes permuted and flipped: S, L, P
            slp = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt("SLP"))
            nib.save(nib.load(path).as_reoriented(slp), path)
    save_scan(scans / "sub" / "ct_a.nii.gz", phantom_hu((40, 48, 36), 0.7, rng))  # same subject id
    save_scan(scans / "ct_nolabel.nii.gz", phantom_hu((40, 48, 36), 0.7, rng))
    bad = _bad_files(scans / "sub")
    del bad["folder.nii.gz"]  # a directory is searched, not read: nothing to report
    (scans / "sub" / "good.nii.gz").unlink()
    (scans / "sub" / "plain.nii").unlink()
    # labels: with and without extensions, every input but ct_nolabel, plus one name with no scan
    names = [f"{n}.nii.gz" if i % 2 else n for i, n in enumerate(GOOD)]
    names += [n for n in bad] + ["not_a_scan"]
    labels = root / "labels.csv"
    labels.write_text("name,label\n" + "".join(f"{n},{i % 3}\n" for i, n in enumerate(names)))
    out = root / "out"
    extra = [str(scans / "sub" / "missing.nii.gz")]
    args = ["--input", str(scans), *extra, "--output", str(out), "--size", str(S),
            "--labels", str(labels), "--folds", "3", "--shards", "3"]
    assert main(args) == 0
    bad.pop("missing.nii.gz")
    return {"out": str(out), "scans": scans, "bad": bad, "labels": read_labels(str(labels)),
            "args": args, "extra": extra}


def _records(out):
    recs = []
    for path in shard_paths(out):
        for raw in tf.data.TFRecordDataset(path):
            recs.append((os.path.basename(path), decode_example(raw.numpy())))
    return recs


def test_every_input_is_written_once_or_dead_lettered(ct_run):
    out = ct_run["out"]
    recs = _records(out)
    ids = [r["subject_id"].decode() for _, r in recs]
    assert sorted(ids) == sorted(GOOD), "each good scan exactly once"
    for _, r in recs:
        assert r["volume"].shape == (S, S, S, 1)
        assert r["volume"].min() >= -1 and r["volume"].max() <= 1 and r["volume"].std() > 0.1

    with open(os.path.join(out, DEAD_LETTER)) as f:
        dead = {os.path.basename(d["source"]): d for d in map(json.loads, f)}
    for name, words in {**ct_run["bad"], "missing.nii.gz": "no such file"}.items():
        assert words in dead[name]["reason"], (name, dead[name])
    assert "duplicate subject id 'ct_a'" in dead["ct_a.nii.gz"]["reason"]
    assert dead["ct_a.nii.gz"]["source"].endswith("sub/ct_a.nii.gz")
    assert "no label" in dead["ct_nolabel.nii.gz"]["reason"]

    summary = json.load(open(os.path.join(out, "summary.json")))
    n_in = len(GOOD) + len(ct_run["bad"]) + 3  # + missing, duplicate, unlabelled
    assert summary["in"] == n_in and summary["written"] == len(GOOD)
    assert summary["failed"] == len(dead) == n_in - len(GOOD) and summary["reconciled"]
    assert summary["labels_unmatched"] == ["not_a_scan"] and summary["wall_time_s"] > 0
    shards = [f"data-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert sorted(os.listdir(out)) == shards + [DEAD_LETTER, "manifest.jsonl", "summary.json"]


def test_manifest_labels_folds_and_shards(ct_run):
    out, labels = ct_run["out"], ct_run["labels"]
    rows = {r["subject_id"]: r for r in read_manifest(out)}
    assert sorted(rows) == sorted(GOOD)
    where = {r["subject_id"].decode(): (shard, r) for shard, r in _records(out)}
    for sid, row in rows.items():
        shard, rec = where[sid]
        assert row["shard"] == shard and row["label"] == labels[sid] == rec["label"]
        assert row["fold"] == rec["fold"] and 0 <= row["fold"] < 3
        assert row["shape"] == [S, S, S] and row["source"].endswith(f"{sid}.nii.gz")
    assert rows["ct_blank"]["kept_slices"] == [4, 37]
    assert rows["ct_flipped"]["orientation"] == "SLP"
    assert rows["ct_flipped"]["spacing"] == [1.2, 0.8, 0.8]
    assert rows["ct_oblique"]["orientation"] == "RAS"

    # folds: KFold-equivalent over the usable subjects, independent of the listing order
    paths = [str(p) for p in ct_run["scans"].rglob("*") if p.is_file() or p.is_symlink()]
    paths += ct_run["extra"]
    entries = plan(sorted(paths), labels, folds=3)
    random.Random(1).shuffle(paths)
    assert {e["source"]: e["fold"] for e in plan(paths, labels, folds=3)} == \
        {e["source"]: e["fold"] for e in entries}
    counts = collections.Counter(e["fold"] for e in entries if "reason" not in e)
    assert max(counts.values()) - min(counts.values()) <= 1 and sorted(counts) == [0, 1, 2]
    planned = {e["subject_id"]: e["fold"] for e in entries if "reason" not in e}
    assert all(row["fold"] == planned[sid] for sid, row in rows.items())


def test_records_read_back_through_the_training_input_unchanged(ct_run):
    out = ct_run["out"]
    rows = {r["subject_id"]: r for r in read_manifest(out)}
    ds = make_dataset(out, batch_size=1, size=S, shuffle=0, repeat=False)
    seen = set()
    for batch in ds:
        sid = batch["subject_id"][0].numpy().decode()
        expected, _ = preprocess_file(rows[sid]["source"], S)
        np.testing.assert_array_equal(batch["volume"][0, ..., 0].numpy(),
                                      expected.astype(np.float16).astype(np.float32))
        assert int(batch["label"][0]) == rows[sid]["label"]
        assert int(batch["fold"][0]) == rows[sid]["fold"]
        seen.add(sid)
    assert seen == set(GOOD)
    held_out = make_dataset(out, batch_size=1, size=S, shuffle=0, repeat=False, folds=[0])
    assert sum(1 for _ in held_out) == sum(r["fold"] == 0 for r in rows.values())


def test_mri_run_refuses_to_overwrite_and_replaces_with_overwrite(tmp_path, capsys):
    scans = tmp_path / "mri"
    scans.mkdir()
    rng = np.random.default_rng(7)
    for i in range(2):
        vol = np.zeros((40, 44, 36), np.float32)
        vol[3:37, 4:40, 4:32] = rng.gamma(3.0, 150.0, size=(34, 36, 28))
        save_scan(scans / f"t1_{i}.nii.gz", vol, spacing=(1, 1, 1), dtype=np.float32)
    (scans / "t1_bad.nii.gz").write_bytes(b"\x1f\x8b garbage")
    out = tmp_path / "out"
    args = ["--input", str(scans / "*.nii.gz"), "--output", str(out), "--size", str(S),
            "--modality", "mri", "--shards", "2"]
    assert main(args) == 0
    assert "scans in: 3, written: 2, failed: 1" in capsys.readouterr().out
    rows = read_manifest(str(out))
    assert [r["kept_slices"] for r in rows] == [[3, 37], [3, 37]]
    assert all(r["modality"] == "mri" and r["intensity_range"][0] == 0 for r in rows)

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err

    assert main(args[:-1] + ["1", "--overwrite"]) == 0  # the stale 2-shard files must go
    assert [os.path.basename(p) for p in shard_paths(str(out))] == ["data-00000-of-00001.tfrecord"]
    assert sum(1 for _ in tf.data.TFRecordDataset(shard_paths(str(out)))) == 2


@pytest.mark.parametrize("extra, message", [
    (["--size", "48"], "power of two"),
    (["--size", "32", "--sise", "3"], "unrecognised arguments"),
    (["--size", "32", "stray"], "unexpected arguments"),
    (["--size", "32", "--folds", "1"], "--folds"),
    (["--size", "32", "--window", "600", "-1024"], "LOW < HIGH"),
    (["--size", "32", "--labels", "/nonexistent/labels.csv"], "--labels"),
    (["--size", "32", "--labels", "BADLABELS"], "header"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, extra, message):
    (tmp_path / "x.nii.gz").write_bytes(b"")
    (tmp_path / "bad.csv").write_text("file,class\nx,1\n")
    extra = [str(tmp_path / "bad.csv") if a == "BADLABELS" else a for a in extra]
    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path / "x.nii.gz"), "--output", str(tmp_path / "o"), *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_no_input_or_unwritable_output_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path / "*.nii.gz"), "--output", str(tmp_path / "o"),
              "--size", "32"])
    assert e.value.code == 2 and "matches no scans" in capsys.readouterr().err
    (tmp_path / "x.nii.gz").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path), "--output", str(tmp_path / "file" / "o"), "--size", "32"])
    assert e.value.code == 2 and "cannot write" in capsys.readouterr().err


def test_script_wrapper_runs(tmp_path, monkeypatch, capsys):
    save_scan(tmp_path / "one.nii.gz", phantom_hu((40, 48, 36), 0.7, np.random.default_rng(0)))
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "pipelines", "preprocess.py")
    monkeypatch.setattr(sys, "argv", [script, "--input", str(tmp_path / "one.nii.gz"),
                                      "--output", str(tmp_path / "o"), "--size", "32"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script, run_name="__main__")
    assert e.value.code == 0 and "written: 1, failed: 0" in capsys.readouterr().out
    assert (tmp_path / "o" / DEAD_LETTER).read_text() == ""  # there, and empty: nothing failed


def test_literal_names_with_glob_characters_a_bom_and_a_url_input(tmp_path, capsys):
    from hagan_tf.preprocess.beam import list_inputs

    for name in ("scan[1].nii.gz", "scan1.nii.gz"):
        save_scan(tmp_path / name, phantom_hu((40, 48, 36), 0.7, np.random.default_rng(0)))
    assert list_inputs([str(tmp_path / "scan[1].nii.gz")]) == [str(tmp_path / "scan[1].nii.gz")]
    assert list_inputs([str(tmp_path / "scan?.nii.gz")]) == [str(tmp_path / "scan1.nii.gz")]
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"\xef\xbb\xbfname,label\nscan1,0\n")  # as Excel's "CSV UTF-8" starts
    assert read_labels(str(labels)) == {"scan1": 0}
    # a URL is copied to local scratch space for nibabel, one scan at a time
    assert main(["--input", f"file://{tmp_path / 'scan1.nii.gz'}", "--output", str(tmp_path / "o"),
                 "--size", "32", "--labels", str(labels)]) == 0
    assert "written: 1, failed: 0" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "o")) == ["data-00000-of-00001.tfrecord", DEAD_LETTER,
                                                  "manifest.jsonl", "summary.json"]


def test_a_remote_scans_local_copy_is_removed_before_the_next_is_read(tmp_path, monkeypatch):
    """On gs:// inputs a shard's scans would otherwise pile up on the worker's disk."""
    import hagan_tf.preprocess.workers as beam_mod  # the workers' code

    for name in ("r1", "r2", "r3"):
        save_scan(tmp_path / f"{name}.nii.gz", phantom_hu((40, 48, 36), 0.7,
                                                          np.random.default_rng(0)))
    (tmp_path / "r2.nii.gz").write_bytes(b"not a scan")  # fails after being copied
    seen = []

    def spy(path, **kw):  # what the scratch directory holds while each scan is read
        seen.append((os.path.basename(path), sorted(os.listdir(os.path.dirname(path)))))
        return preprocess_file(path, **kw)

    monkeypatch.setattr(beam_mod, "preprocess_file", spy)
    entries = plan([f"file://{tmp_path}/{n}.nii.gz" for n in ("r1", "r2", "r3")])
    out = tmp_path / "out"
    out.mkdir()
    results = list(beam_mod.WriteShard(str(out), 1, size=32).process((0, entries)))
    assert seen == [(f"{n}.nii.gz", [f"{n}.nii.gz"]) for n in ("r1", "r2", "r3")]
    assert [r["subject_id"] for r in results if isinstance(r, dict)] == ["r1", "r3"]
    assert [r.value["subject_id"] for r in results if not isinstance(r, dict)] == ["r2"]
