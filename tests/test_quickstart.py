"""The README's first command: `hagan-quickstart` runs the whole chain and leaves files to open."""

import csv
import json
import os
import subprocess
import sys

import nibabel as nib


def test_quickstart_runs_the_chain_and_writes_what_it_lists(tmp_path):
    out = str(tmp_path / "qs")
    code = "import sys; from hagan_tf.quickstart import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", code, "--out", out, "--scans", "12", "--steps", "4"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "quickstart finished" in res.stdout

    samples = sorted(f for f in os.listdir(os.path.join(out, "samples")) if f.endswith(".nii.gz"))
    assert len(samples) == 4
    assert nib.load(os.path.join(out, "samples", samples[0])).shape[:3] == (32, 32, 32)
    for png in ("samples/montage.png", "report/montage.png", "report/mds.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
    with open(os.path.join(out, "report", "metrics.json")) as f:
        report = json.load(f)
    assert report["model"]["step"] == 4
    fid = [m["value"] for m in report["metrics"] if m["name"] == "fid"]
    assert fid and all(v >= 0 for v in fid)
    with open(os.path.join(out, "embeddings.csv")) as f:
        rows = list(csv.reader(f))
    assert len(rows) == 1 + 4 and len(rows[1]) == 1 + 64  # header, four scans: path + tiny_32 latent
    with open(os.path.join(out, "data", "dead_letter.jsonl")) as f:
        dead = [json.loads(line) for line in f]
    assert len(dead) == 1 and "corrupt.nii.gz" in json.dumps(dead[0])
    events = os.listdir(os.path.join(out, "run", "tensorboard"))
    assert any(e.startswith("events.out.tfevents") for e in events)


def test_overwrite_replaces_only_what_a_quickstart_writes(tmp_path, capsys):
    import pytest

    from hagan_tf.quickstart import main

    (tmp_path / "run").mkdir()
    (tmp_path / "thesis.tex").write_text("mine")  # `--out . --overwrite` must not take this
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), "--overwrite"])
    assert e.value.code == 2 and "did not write (thesis.tex)" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["run", "thesis.tex"]
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "thesis.tex")])
    assert e.value.code == 2 and "is a file" in capsys.readouterr().err
