"""hagan-regress: Ridge from embeddings to a measurement, scored by cross-validated R^2."""

import json

import numpy as np
import pytest

from hagan_tf.apps import regress
from hagan_tf.apps.common import write_csv

LATENT = 16


def write_tables(d, z, targets: dict, ids=None):
    ids = ids or [f"s{i:03d}" for i in range(len(z))]
    emb = write_csv(str(d / "embeddings.csv"), ["subject_id"] + [f"z{i}" for i in range(z.shape[1])],
                    ([s] + list(row) for s, row in zip(ids, z)))
    cols = list(targets)
    tgt = write_csv(str(d / "targets.csv"), ["subject_id"] + cols,
                    ([s] + [targets[c][i] for c in cols] for i, s in enumerate(ids)))
    return emb, tgt


@pytest.fixture
def planted(tmp_path):
    rng = np.random.default_rng(1)
    z = rng.standard_normal((120, LATENT))
    signal = 2.0 + z @ rng.standard_normal(LATENT) + 0.05 * rng.standard_normal(120)
    noise = rng.standard_normal(120)
    return (tmp_path, *write_tables(tmp_path, z, {"signal": signal, "noise": noise,
                                                  "positive": np.exp(0.1 * signal)}))


def run_regress(d, emb, tgt, target, *extra):
    regress.main(["--embeddings", emb, "--targets", tgt, "--target", target,
                  "--out", str(d / "out"), *extra])
    with open(d / "out" / f"regress_{target}.json") as f:
        return json.load(f)


def test_planted_linear_signal_is_recovered(planted):
    d, emb, tgt = planted
    r = run_regress(d, emb, tgt, "signal")
    assert r["r2_mean"] > 0.99 and r["r2_pooled"] > 0.99
    assert len(r["r2_folds"]) == 5 and r["n"] == 120 and r["latent_dim"] == LATENT
    assert (d / "out" / "regress_signal.png").stat().st_size > 1000


def test_noise_target_has_no_skill(planted):
    d, emb, tgt = planted
    r = run_regress(d, emb, tgt, "noise")
    assert r["r2_mean"] < 0.1


def test_log_target_and_dropped_rows(planted, capsys):
    d, emb, tgt = planted
    r = run_regress(d, emb, tgt, "positive", "--log", "--folds", "4")
    assert r["log"] and r["folds"] == 4 and r["r2_mean"] > 0.99  # log(exp(0.1 * signal)) is linear
    # a negative value is left out of a log regression, an empty cell always, with a warning
    rows = open(tgt).read().splitlines()
    rows[1] = rows[1].rsplit(",", 1)[0] + ",-1"
    rows[2] = rows[2].rsplit(",", 1)[0] + ","
    open(tgt, "w").write("\n".join(rows) + "\n")
    r = run_regress(d, emb, tgt, "positive", "--log")
    assert r["n"] == 118
    assert "2 of 120 subjects left out" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--target", "missing"], "no column 'missing'"),
    (["--target", "signal", "--folds", "1"], "--folds must be at least 2"),
    (["--target", "signal", "--embeddings", "nope.csv"], "no such file"),
])
def test_bad_requests_exit_2_with_a_message(planted, capsys, args, message):
    d, emb, tgt = planted
    base = {"--embeddings": emb, "--targets": tgt, "--out": str(d / "out")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    with pytest.raises(SystemExit) as e:
        regress.main([x for kv in base.items() for x in kv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_targets_from_a_spreadsheet_with_a_bom_but_not_with_repeated_subjects(planted, capsys):
    d, emb, tgt = planted
    text = open(tgt, encoding="utf-8").read()
    open(tgt, "w", encoding="utf-8-sig").write(text)  # as Excel's "CSV UTF-8" writes it
    assert run_regress(d, emb, tgt, "signal")["n"] == 120
    lines = text.splitlines()
    open(tgt, "w").write("\n".join(lines + [lines[1]]) + "\n")  # s000 twice: a second visit
    with pytest.raises(SystemExit) as e:
        run_regress(d, emb, tgt, "signal")
    assert e.value.code == 2 and "lists subject ids more than once: s000" in capsys.readouterr().err
