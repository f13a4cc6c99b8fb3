"""Issue 3: the four-update step, distribution, resume, the hagan-train CLI."""

import os
import re

import numpy as np
import pytest
import tensorflow as tf

import keras

from hagan_tf import HAGAN, HAGANConfig
from hagan_tf.data.pipeline import make_dataset
from hagan_tf.data.records import ShardWriter
from hagan_tf.data.synthetic import write_synthetic_dataset
from hagan_tf.training.cli import main as train_main
from hagan_tf.training.cli import train


def tiny(**kw):
    base = dict(size=32, width=0.125, latent_dim=16, batch_size=2, checkpoint_every=2,
                log_every=1, image_every=2)
    return HAGANConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("data")), n=8, size=32, num_classes=2)


def _snapshot(variables):
    return [v.numpy().copy() for v in variables]


def _changed(before, variables):
    return [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables)]


@pytest.mark.parametrize("classes", [0, 2])
def test_each_update_changes_only_its_own_variables(data, classes):
    cfg = tiny(num_classes=classes)
    gan = HAGAN(cfg)
    gan.compile()
    batch = next(iter(make_dataset(data, 2, size=32, shuffle=0)))
    volume, labels = batch["volume"], batch["label"] if classes else None
    crop = gan.draw_crop(0)
    slab, low = gan.real_slab(volume, crop), gan.real_low_res(volume)
    nets = {"G": gan.generator, "D": gan.discriminator, "E^H": gan.encoder.high_res,
            "E^G": gan.encoder.ground}
    opts = {"G": gan.g_optimizer, "D": gan.d_optimizer, "E^H": gan.eh_optimizer,
            "E^G": gan.eg_optimizer}
    updates = {
        "D": lambda: gan.d_update(slab, low, labels, crop, gan.draw_z(0, 2, 0), 2.0),
        "G": lambda: gan.g_update(labels, crop, gan.draw_z(0, 2, 1), 2.0),
        "E^H": lambda: gan.eh_update(slab, 2.0),
        "E^G": lambda: gan.eg_update(volume, slab, low, labels, crop, 2.0),
    }
    for name, update in updates.items():
        before = {k: _snapshot(n.trainable_variables) for k, n in nets.items()}
        steps = {k: int(o.iterations.numpy()) for k, o in opts.items()}
        logs = update()
        assert all(np.isfinite(float(v)) for v in logs.values())
        for k, net in nets.items():
            changed = _changed(before[k], net.trainable_variables)
            if k == name:
                assert any(changed), f"update {name} changed nothing"
            else:
                assert not any(changed), f"update {name} changed {k}'s variables"
            assert int(opts[k].iterations.numpy()) == steps[k] + (k == name)


def test_crop_is_shared_multiple_of_four_and_in_range():
    gan = HAGAN(tiny())
    crops = {int(gan.draw_crop(s)) for s in range(64)}
    assert crops <= set(range(0, 29, 4)) and len(crops) == 8  # all 8 aligned starts occur
    assert int(gan.draw_crop(5)) == int(gan.draw_crop(5))


def test_input_order_is_reproducible_and_resumes_at_a_step(data):
    def order(n_batches=12, **kw):
        it = iter(make_dataset(data, 2, size=32, shuffle=4, **kw))
        return [s.decode() for _ in range(n_batches) for s in next(it)["subject_id"].numpy()]

    first = order()
    assert first == order()
    assert order(start_step=5) == first[10:] + order(n_batches=17)[24:]  # 8 records an epoch
    assert sorted(first[:8]) == sorted(first[8:16]) and first[:8] != first[8:16]  # reshuffled
    assert order(seed=1) != first


def test_training_input_is_one_order_for_any_replica_count_and_resumes_each_worker(data):
    from hagan_tf.training.cli import training_input

    cfg = tiny(batch_size=4, shuffle_buffer=4)

    def volumes(ds, n):
        return [np.asarray(b["volume"], np.float32) for _, b in zip(range(n), ds)]

    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    mirrored = tf.distribute.MirroredStrategy(devices)  # one machine, two replicas
    it = iter(training_input(mirrored, data, cfg))
    for want in volumes(make_dataset(data, 4, size=32, shuffle=4), 3):
        halves = mirrored.experimental_local_results(next(it)["volume"])
        assert len(halves) == 2
        np.testing.assert_array_equal(np.concatenate([h.numpy() for h in halves]), want)

    class Worker:  # worker i of two machines with a replica each, as MultiWorkerMirrored calls it
        def __init__(self, i):
            self.i = i

        def distribute_datasets_from_function(self, fn):
            return fn(tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=self.i,
                                                 num_replicas_in_sync=2))

    epochs = np.concatenate(volumes(make_dataset(data, 2, size=32, shuffle=4), 24))  # 8 records each
    for i in (0, 1):
        stream = np.concatenate(volumes(training_input(Worker(i), data, cfg), 12))  # 2 a step
        for k in range(3):  # worker i reads epochs i, i+2, i+4: every record once in each
            np.testing.assert_array_equal(stream[8 * k:8 * k + 8], epochs[8 * (i + 2 * k):8 * (i + 2 * k) + 8])
        resumed = np.concatenate(volumes(training_input(Worker(i), data, cfg, start_step=7), 2))
        np.testing.assert_array_equal(resumed, stream[14:18])  # across its epoch boundary


def test_volumes_keep_the_stored_float16_when_asked(data):
    batch = next(iter(make_dataset(data, 2, size=32, shuffle=0, dtype=tf.float16)))
    as_float32 = next(iter(make_dataset(data, 2, size=32, shuffle=0)))["volume"]
    assert batch["volume"].dtype == tf.float16 and as_float32.dtype == tf.float32
    np.testing.assert_array_equal(tf.cast(batch["volume"], tf.float32).numpy(), as_float32.numpy())


def test_mirrored_strategy_two_replicas(data):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    if len(devices) < 2:
        pytest.fail("conftest.py must configure 2 logical CPU devices before TF initialises")
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        gan = HAGAN(tiny(batch_size=4))
        gan.compile()
    ds = make_dataset(data, 4, size=32).map(lambda r: {"volume": r["volume"], "label": r["label"]})
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            opts = (gan.g_optimizer, gan.d_optimizer, gan.eh_optimizer, gan.eg_optimizer)
            seen.append(([int(o.iterations.numpy()) for o in opts], dict(logs)))

    gan.fit(ds, steps_per_epoch=3, epochs=1, verbose=0, callbacks=[Record()])
    assert [s for s, _ in seen] == [[1] * 4, [2] * 4, [3] * 4]
    assert all(np.isfinite(float(v)) for _, logs in seen for v in logs.values())
    for v in gan.weights:
        values = strategy.experimental_local_results(v.value)
        assert len(values) == 2
        np.testing.assert_array_equal(values[0].numpy(), values[1].numpy(), err_msg=v.path)
    with pytest.raises(ValueError, match="batch_size 3 is the global batch and must be a multiple of the 2"):
        train(tiny(batch_size=3), data, "/nonexistent/run", strategy, progress=False)
    with pytest.raises(ValueError, match="jit_compile needs a single replica, not 2"):
        train(tiny(jit_compile=True), data, "/nonexistent/run", strategy, progress=False)


_WORKER = """
import hashlib, json, sys
from hagan_tf import HAGANConfig
from hagan_tf.training.cli import train
r = train(HAGANConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], sys.argv[3], progress=False,
          handle_signals=True)
h = hashlib.sha256()
for v in r["model"].weights:
    h.update(v.numpy().tobytes())
signal = r["signal"] and r["signal"].name
print("RESULT", json.dumps({"step": r["step"], "weights": h.hexdigest(), "error": r["error"],
                            "signal": signal}), flush=True)
"""


def _run_workers(cfg, data, run_dir, n=2, timeout=300, sigterm_worker_when=None, cli=False):
    """`train` in n local worker processes under TF_CONFIG, as a user starts them; with
    `sigterm_worker_when=(i, ready)`, worker i gets SIGTERM once ready() is true. With `cli`,
    `hagan-train` itself, and each worker's {'rc', 'output'}. `data` may list one per worker."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from hagan_tf.training import local_tf_configs

    if cli:
        config = os.path.join(os.path.dirname(run_dir), "config.yaml")
        cfg.to_yaml(config)

        def command(data):
            return [sys.executable, "-m", "hagan_tf.training.cli", "--config", config, "--data",
                    data, "--out", run_dir, "--no-progress"]
    else:
        def command(data):
            return [sys.executable, "-c", _WORKER, json.dumps(cfg.to_dict()), data, run_dir]
    procs = [subprocess.Popen(
        command(d),
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
             "TF_CONFIG": tf_config}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for d, tf_config in zip(data if isinstance(data, list) else [data] * n,
                                local_tf_configs(n))]
    results = []
    try:
        if sigterm_worker_when:
            i, ready = sigterm_worker_when
            deadline = time.monotonic() + timeout
            while not ready():
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
                time.sleep(0.2)
            procs[i].send_signal(signal.SIGTERM)
        for i, p in enumerate(procs):
            out = p.communicate(timeout=timeout)[0]
            if cli:
                results.append({"rc": p.returncode, "output": out})
                continue
            lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
            assert p.returncode == 0 and lines, f"worker {i} failed:\n{out[-3000:]}"
            results.append({**json.loads(lines[-1][len("RESULT "):]), "output": out})
    finally:
        for p in procs:
            p.kill()
    return results


def test_multi_worker_training_writes_one_run_and_resumes(data, tmp_path):
    """Two workers under TF_CONFIG (MultiWorkerMirroredStrategy): identical weights on both,
    one writer of the run directory (worker 0), and a re-run resumes both from its checkpoint
    and its place in the input, ending with an uninterrupted run's weights."""
    run = str(tmp_path / "run")
    cfg = tiny(max_steps=2, checkpoint_every=1)
    first = _run_workers(cfg, data, run)
    assert [r["step"] for r in first] == [2, 2] and not any(r["error"] for r in first)
    assert first[0]["weights"] == first[1]["weights"]
    second = _run_workers(cfg.replace(max_steps=3), data, run)
    assert [r["step"] for r in second] == [3, 3]
    assert second[0]["weights"] == second[1]["weights"] != first[0]["weights"]
    uninterrupted = _run_workers(cfg.replace(max_steps=3), data, str(tmp_path / "one_go"))
    assert uninterrupted[0]["weights"] == second[0]["weights"]
    assert sorted(os.listdir(run)) == ["checkpoints", "config.yaml", "tensorboard"]  # no scratch
    assert len(os.listdir(os.path.join(run, "tensorboard"))) == 2  # one events file per run
    step, _ = _weights(run)
    assert step == 3


def test_sigterm_to_one_worker_stops_every_worker_after_the_same_step_with_a_checkpoint(data, tmp_path):
    """Preemption of one machine: the workers agree after each step, so all stop after the
    same one and save it together (a worker that left alone would hang the others)."""
    run = str(tmp_path / "run")
    ckpts = os.path.join(run, "checkpoints")
    cfg = tiny(max_steps=200, checkpoint_every=2)
    stopped = _run_workers(cfg, data, run, sigterm_worker_when=(1, lambda: os.path.exists(
        os.path.join(ckpts, "ckpt-2.index"))))
    step = stopped[0]["step"]
    assert 2 <= step < 200 and [r["step"] for r in stopped] == [step, step]
    assert [r["signal"] for r in stopped] == ["SIGTERM", "SIGTERM"]  # worker 0 got none itself
    assert stopped[0]["weights"] == stopped[1]["weights"]
    assert "SIGTERM: stopping every worker after this step" in stopped[1]["output"]
    assert tf.train.latest_checkpoint(ckpts).endswith(f"ckpt-{step}")
    resumed = _run_workers(cfg.replace(max_steps=step + 1), data, run)
    assert [r["step"] for r in resumed] == [step + 1] * 2 and not any(r["signal"] for r in resumed)
    assert "resuming from" in resumed[0]["output"] and f"(step {step})" in resumed[0]["output"]


def _weights(run):
    from hagan_tf.rundir import load_hagan

    model, step = load_hagan(run)
    return step, [w.numpy() for w in model.weights]


def test_resume_continues_and_matches_uninterrupted_run(data, tmp_path):
    cfg = tiny(max_steps=4)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    strategy = tf.distribute.get_strategy()
    assert train(cfg, data, a, strategy, progress=False)["step"] == 4
    assert train(cfg.replace(max_steps=2), data, b, strategy, progress=False)["step"] == 2
    resumed = train(cfg, data, b, strategy, progress=False)
    assert resumed["step"] == 4 and resumed["checkpoint"].endswith("ckpt-4")
    (sa, wa), (sb, wb) = _weights(a), _weights(b)
    assert sa == sb == 4
    for x, y in zip(wa, wb):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_resume_refuses_a_different_model(data, tmp_path):
    run = str(tmp_path / "run")
    train(tiny(max_steps=1), data, run, tf.distribute.get_strategy(), progress=False)
    with pytest.raises(ValueError, match="latent_dim"):
        train(tiny(max_steps=2).replace(latent_dim=32), data, run, progress=False)
    # A run that failed before its first checkpoint holds nothing to resume: any config goes.
    early = str(tmp_path / "early")
    from hagan_tf.rundir import write_config

    write_config(early, tiny(latent_dim=32))
    assert train(tiny(max_steps=1), data, early, tf.distribute.get_strategy(),
                 progress=False)["step"] == 1


def test_a_conditional_config_refuses_records_without_a_label_it_knows(data, tmp_path):
    """one_hot would train a zero class for them (and the class loss fails or is NaN)."""
    with pytest.raises(ValueError, match=r"num_classes is 1 but 4 training record\(s\) .* no label "
                                         r"in 0..0 .*--set num_classes=0"):
        train(tiny(num_classes=1), data, str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run")


def test_cli_writes_checkpoints_tensorboard_and_config(data, tmp_path, capsys):
    run = str(tmp_path / "run")
    rc = train_main(["--config", "tiny_32", "--data", data, "--out", run, "--max-steps", "3",
                     "--set", "checkpoint_every=2", "--set", "image_every=1", "--strategy",
                     "default", "--no-progress"])
    assert rc == 0
    ckpts = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert any(c.startswith("ckpt-2.") for c in ckpts) and any(c.startswith("ckpt-3.") for c in ckpts)
    assert HAGANConfig.from_yaml(os.path.join(run, "config.yaml")).max_steps == 3
    events = [f for f in os.listdir(os.path.join(run, "tensorboard")) if "tfevents" in f]
    assert events
    tags = set()
    for e in tf.compat.v1.train.summary_iterator(os.path.join(run, "tensorboard", events[0])):
        tags |= {v.tag for v in e.summary.value}
    for tag in ("loss/d_loss", "loss/g_loss", "loss/eh_loss", "loss/eg_loss", "learning_rate/g",
                "time/step_seconds", "real/axial", "fake_slab/coronal", "fake_volume/sagittal",
                "reconstruction/axial"):
        assert tag in tags, tag


def test_images_above_128_show_the_slab_reconstruction_instead_of_whole_volumes(tmp_path):
    from hagan_tf.training.callbacks import Monitor

    gan = HAGAN(tiny(size=256, latent_dim=8, width=0.0625))
    real = tf.random.uniform((1, 256, 256, 256, 1), -1, 1)
    monitor = Monitor(str(tmp_path), 1, 1, 1, sample_batch={"volume": real}, progress=False)
    monitor.set_model(gan)
    monitor.write_images(1)
    monitor.writer.flush()
    tags = set()
    for name in os.listdir(tmp_path):
        for e in tf.compat.v1.train.summary_iterator(os.path.join(tmp_path, name)):
            tags |= {v.tag for v in e.summary.value}
    assert {"real/axial", "fake_slab/axial", "real_slab/sagittal",
            "reconstruction_slab/coronal"} <= tags and not any("volume" in t for t in tags)


def test_a_single_shard_larger_than_the_shuffle_block_is_warned_about(tmp_path, capsys):
    """Blocks of consecutive records are shuffled, and shards interleaved: one shard alone
    would keep each epoch nearly in file order."""
    from hagan_tf.training.cli import describe_training_set

    one = write_synthetic_dataset(str(tmp_path / "one"), n=4, size=32, shards=1)
    assert describe_training_set(one, tiny(shuffle_buffer=2)).startswith("4 volumes")
    assert "all 4 records are in one shard" in capsys.readouterr().err
    describe_training_set(one, tiny(shuffle_buffer=4))
    assert capsys.readouterr().err == ""


def test_cli_rejects_bad_arguments(data, tmp_path, capsys):
    assert train_main(["--config", "nope", "--data", data, "--out", str(tmp_path / "r")]) == 2
    assert "no config file or preset" in capsys.readouterr().err
    rc = train_main(["--config", "tiny_32", "--set", "size=64", "--data", data,
                     "--out", str(tmp_path / "r")])
    assert rc == 2 and "are not 64^3 (e.g. phantom" in capsys.readouterr().err
    one_fold = write_synthetic_dataset(str(tmp_path / "one_fold"), n=2, size=32, folds=1)
    rc = train_main(["--config", "tiny_32", "--set", "fold=0", "--data", one_fold,
                     "--out", str(tmp_path / "r")])  # else every epoch would be empty, forever
    assert rc == 2 and "no records in" in capsys.readouterr().err
    os.remove(os.path.join(one_fold, "manifest.jsonl"))  # the same without a manifest to count
    rc = train_main(["--config", "tiny_32", "--set", "fold=0", "--data", one_fold,
                     "--out", str(tmp_path / "r")])
    assert rc == 2 and "are outside the held-out fold 0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")
    (tmp_path / "a_file").write_text("")
    rc = train_main(["--config", "tiny_32", "--data", data, "--out", str(tmp_path / "a_file" / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write the run directory" in err and "Traceback" not in err


def test_empty_shards_are_passed_over_and_a_dataset_of_none_says_why(data, tmp_path):
    """hagan-preprocess writes a shard per input when inputs are few; a refused scan's stays empty."""
    from hagan_tf.data.pipeline import check_records
    from hagan_tf.data.records import first_record

    gaps = tmp_path / "gaps"
    gaps.mkdir()
    (gaps / "data-00000-of-00003.tfrecord").write_bytes(b"")
    shards = sorted(n for n in os.listdir(data) if n.endswith(".tfrecord"))
    for i, name in enumerate(shards):
        os.symlink(os.path.join(data, name), gaps / f"data-{i + 1:05d}-of-00003.tfrecord")
    assert first_record(str(gaps))["shape"].tolist() == [32, 32, 32]
    check_records(str(gaps), 32)
    none = tmp_path / "none"
    none.mkdir()
    (none / "data-00000-of-00001.tfrecord").write_bytes(b"")
    (none / "manifest.jsonl").write_text("")
    (none / "dead_letter.jsonl").write_text('{"source": "a.nii.gz", "reason": "smaller than 256"}\n')
    with pytest.raises(ValueError, match=r"no records in .*every shard is empty \(hagan-preprocess "
                                         r"refused every scan: see its dead_letter.jsonl\)"):
        check_records(str(none), 32)


def test_records_of_another_size_are_refused_by_name_before_any_work(data, tmp_path, capsys):
    from hagan_tf.apps.embed import main as embed_main
    from hagan_tf.data.pipeline import check_records

    check_records(data, 32)
    with pytest.raises(ValueError, match=r"^\d+ of \d+ volume\(s\) .* are not 64\^3 \(e.g. phantom\d+: \(32, 32, 32\)\)"):
        check_records(data, 64)
    bare = tmp_path / "bare"  # no manifest: the first record stands for all
    bare.mkdir()
    for name in os.listdir(data):
        if name.endswith(".tfrecord"):
            os.symlink(os.path.join(data, name), bare / name)
    with pytest.raises(ValueError, match=r"^the volumes .* are not 64\^3"):
        check_records(str(bare), 64)
    run = str(tmp_path / "run")
    from hagan_tf.rundir import save_model, write_config
    cfg = HAGANConfig(size=64, width=0.125, latent_dim=16)
    write_config(run, cfg)
    save_model(run, HAGAN(cfg), 0)
    with pytest.raises(SystemExit) as e:
        embed_main(["--run", run, "--data", data, "--out", str(tmp_path / "e.csv")])
    assert e.value.code == 2 and "hagan-preprocess --size 64" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "e.csv")


def _damaged_copy(data, dest, damage):
    import shutil

    shutil.copytree(data, dest)
    path = os.path.join(dest, sorted(n for n in os.listdir(dest) if n.endswith(".tfrecord"))[1])
    raw = bytearray(open(path, "rb").read())
    open(path, "wb").write(damage(raw))
    return str(dest), os.path.basename(path)


def test_a_dataset_rewritten_in_place_and_values_float16_cannot_hold(data, tmp_path):
    """ShardWriter replaces an earlier dataset's shards (a stale one would be read too), marks
    an interrupted write unfinished, and refuses what float16 would store as inf."""
    from hagan_tf.data.records import SUMMARY, read_manifest

    for sibling in ("d1", "d2"):  # a bracket in a directory name is no pattern
        write_synthetic_dataset(str(tmp_path / sibling), n=2, size=32)
    before = [sorted(os.listdir(tmp_path / sibling)) for sibling in ("d1", "d2")]
    write_synthetic_dataset(str(tmp_path / "d[12]"), n=2, size=32)
    assert [sorted(os.listdir(tmp_path / sibling)) for sibling in ("d1", "d2")] == before
    assert sum(1 for _ in make_dataset(str(tmp_path / "d[12]"), 1, size=32, repeat=False)) == 2
    d = str(tmp_path / "d")
    write_synthetic_dataset(d, n=4, size=32, shards=3)
    write_synthetic_dataset(d, n=4, size=32, shards=2)
    assert sorted(n for n in os.listdir(d) if n.endswith(".tfrecord")) == [
        "data-00000-of-00002.tfrecord", "data-00001-of-00002.tfrecord"]
    assert sum(1 for _ in make_dataset(d, 1, size=32, repeat=False)) == 4
    with pytest.raises(ValueError, match=r"x: values beyond float16's range \(65504\)"):
        with ShardWriter(d, 1) as w:
            w.write(np.full((32, 32, 32), 1.0, np.float32), "ok")
            w.write(np.full((32, 32, 32), 7e4, np.float32), "x")
    assert not os.path.exists(os.path.join(d, SUMMARY)) and len(read_manifest(d)) == 1
    with open(os.path.join(d, "manifest.jsonl"), "a") as f:
        f.write('{"subject_id": "cut')
    with pytest.raises(ValueError, match=r"manifest.jsonl, line 2: not a JSON row"):
        read_manifest(d)
    with pytest.raises(ValueError, match="no records .* pass the fold selection"):
        make_dataset(data, 2, size=32, exclude_folds=[-1])  # would loop over empty epochs


def test_a_checkpoint_cut_short_is_a_clear_error(data, tmp_path):
    from hagan_tf.rundir import load_hagan

    run = str(tmp_path / "run")
    train(tiny(max_steps=1), data, run, tf.distribute.get_strategy(), progress=False)
    ckpts = os.path.join(run, "checkpoints")
    shard = next(os.path.join(ckpts, n) for n in os.listdir(ckpts) if ".data-" in n)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)  # an interrupted copy of the run directory
    with pytest.raises(ValueError, match="checkpoint .*ckpt-1 is unreadable"):
        load_hagan(run)


def test_damaged_shards_are_named_before_any_work(data, tmp_path):
    from hagan_tf.data.records import shard_problems

    assert shard_problems(data) == []
    cut, name = _damaged_copy(data, tmp_path / "cut", lambda raw: raw[:30000])  # a partial copy
    with pytest.raises(ValueError, match=rf"damaged records .*{name}: record 0 is cut short .*truncated"):
        train(tiny(max_steps=2), cut, str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run")
    extra, name = _damaged_copy(data, tmp_path / "extra", lambda raw: raw + raw[:len(raw) // 4])  # one record more
    assert shard_problems(extra) == [f"{name}: 5 record(s), the manifest lists 4"]
    os.remove(os.path.join(extra, name))
    assert shard_problems(extra) == [f"{name}: missing, the manifest lists 4 record(s) in it"]


def _flip(raw):
    raw[5000] ^= 0xFF  # inside the first record's volume bytes: the framing stays intact
    return raw


def test_a_record_failing_its_checksum_stops_training_with_a_checkpoint_and_the_shard(data, tmp_path):
    flipped, name = _damaged_copy(data, tmp_path / "flip", _flip)
    run = str(tmp_path / "run")
    with pytest.raises(ValueError, match=rf"at step (\d+) .*{name}: corrupted record") as e:
        train(tiny(max_steps=8), flipped, run, tf.distribute.get_strategy(), progress=False)
    step = int(e.value.args[0].split("at step ")[1].split()[0])
    assert step < 8 and f"Step {step} is checkpointed" in e.value.args[0]
    assert tf.train.latest_checkpoint(os.path.join(run, "checkpoints")).endswith(f"ckpt-{step}")


def test_a_record_failing_its_checksum_on_one_worker_stops_every_worker_with_its_reason(data, tmp_path):
    """Each machine reads its own copy of the data; here worker 1's is damaged. It names the
    shard (exit 2) and relays that to worker 0, whose collective would otherwise fail a minute
    later with only 'task 1 stopped sending heartbeats' and a traceback."""
    flipped, name = _damaged_copy(data, tmp_path / "flip", _flip)
    results = _run_workers(tiny(max_steps=12), [data, flipped], str(tmp_path / "run"), cli=True)
    outs = [r["output"] for r in results]
    assert [r["rc"] for r in results] == [1, 2], outs[0][-3000:] + outs[1][-3000:]
    assert f"{name}: corrupted record" in outs[1] and "No step is checkpointed yet" in outs[1]
    assert re.search(r"hagan-train: error: worker 0 stopped at step \d+ because worker 1 failed: "
                     rf"damaged records in '.*flip' at step \d+ .*{name}: corrupted record", outs[0])
    assert not any("Traceback" in out for out in outs)


def test_sigterm_saves_the_running_step_and_exits_143(data, tmp_path):
    """Preemption (SIGTERM) or Ctrl-C ends training after the running step with a checkpoint of
    it, not of the last multiple of checkpoint_every (10 in tiny_32)."""
    import signal
    import subprocess
    import sys

    run = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "hagan_tf.training.cli", "--config", "tiny_32",
                             "--data", data, "--out", run, "--max-steps", "200"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = b""
    while b" 2/200" not in err:  # the progress bar has shown step 2
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, err.decode()[-2000:]
        err += chunk
    proc.send_signal(signal.SIGTERM)
    out, rest = proc.communicate(timeout=300)
    assert proc.returncode == 143, (err + rest).decode()[-2000:]
    step = int(tf.train.latest_checkpoint(os.path.join(run, "checkpoints")).rsplit("-", 1)[1])
    assert 2 <= step < 10
    assert f"step {step}: checkpoint" in out.decode() and "stopped by SIGTERM" in out.decode()
    assert b"SIGTERM: stopping after this step" in err + rest


def test_nan_loss_stops_with_its_name_and_step_and_keeps_last_checkpoint(data, tmp_path, capsys):
    run = str(tmp_path / "run")
    cfg = tiny(max_steps=2)
    train(cfg, data, run, tf.distribute.get_strategy(), progress=False)
    bad = str(tmp_path / "nan")
    with ShardWriter(bad, 1) as w:
        for i in range(4):
            w.write(np.full((32, 32, 32), np.nan, np.float32), f"nan{i}", dtype="float32")
    result = train(cfg.replace(max_steps=4), bad, run, tf.distribute.get_strategy(), progress=False)
    assert result["error"] and "at step 3" in result["error"]
    assert result["error"].split()[1] in {"d_loss", "d_real", "d_fake", "g_loss", "eh_loss", "eg_loss"}
    assert result["checkpoint"].endswith("ckpt-2")
    logged = {}  # the failed step is on the curves
    for name in os.listdir(os.path.join(run, "tensorboard")):
        for e in tf.compat.v1.train.summary_iterator(os.path.join(run, "tensorboard", name)):
            for v in e.summary.value:
                logged.setdefault(e.step, {})[v.tag] = tf.make_ndarray(v.tensor)
    assert not np.isfinite(logged[3][f"loss/{result['error'].split()[1]}"])
    # The remedy the message names: resume from the last good checkpoint with other rates.
    capsys.readouterr()
    resumed = train(cfg.replace(max_steps=3, lr_d=1e-5, seed=7), data, run,
                    tf.distribute.get_strategy(), progress=False)
    assert resumed["step"] == 3 and resumed["error"] is None
    assert "resuming with lr_d 0.0004 -> 1e-05, seed 0 -> 7" in capsys.readouterr().err
    assert float(resumed["model"].d_optimizer.learning_rate.numpy()) == pytest.approx(1e-5)
    fresh = train(cfg.replace(max_steps=4, checkpoint_every=100), bad, str(tmp_path / "fresh"),
                  tf.distribute.get_strategy(), progress=False)
    assert fresh["error"] and "no checkpoint was written yet" in capsys.readouterr().err


def test_weights_that_are_not_finite_are_never_checkpointed(tmp_path):
    """The losses are computed before the step's last update (E^G): they can be finite while
    the weights that would be saved are not."""
    from hagan_tf.training.callbacks import Checkpointer, Monitor

    gan = HAGAN(tiny())
    gan.compile()
    ckpt = tf.train.Checkpoint(model=gan)
    manager = tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=2)
    monitor = Monitor(None, 10, 1, 100, progress=False)
    saver = Checkpointer(manager, tf.Variable(0, dtype=tf.int64), 1, guard=monitor)
    saver.set_model(gan)
    saver.save()
    assert manager.latest_checkpoint.endswith("ckpt-0")
    w = gan.encoder.ground.trainable_variables[0]
    w.assign(tf.fill(w.shape, np.inf))
    gan.d_optimizer.iterations.assign(1)
    saver.save()
    assert manager.latest_checkpoint.endswith("ckpt-0") and gan.stop_training
    assert monitor.error.startswith("weights became non-finite at step 1; training stopped")


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_step_is_finite(data, policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        gan = HAGAN(tiny(mixed_precision=policy, num_classes=2))
        gan.compile()
        if policy == "mixed_float16":
            assert isinstance(gan.g_optimizer, keras.optimizers.LossScaleOptimizer)
        assert gan.generator.common.get_layer("fc").compute_dtype == policy.split("_")[1]
        ds = make_dataset(data, 2, size=32).map(lambda r: {"volume": r["volume"], "label": r["label"]})
        logs = gan.fit(ds, steps_per_epoch=2, epochs=1, verbose=0).history
        assert all(np.isfinite(v[-1]) for v in logs.values()), {k: v[-1] for k, v in logs.items()}
        assert gan.generator.common.get_layer("fc").kernels[0].dtype == "float32"  # master weights
    finally:
        keras.mixed_precision.set_global_policy("float32")


_LSO_REPLICAS = """
import json
import numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
from hagan_tf.optimizers import Adam, LossScaleOptimizer
strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")][:2])
with strategy.scope():
    v = tf.Variable([1.0, 1.0])
    opt = LossScaleOptimizer(Adam(1e-2, beta_1=0.0), initial_scale=8.0)
    opt.build([v])

@tf.function
def step(overflow_on_replica_1):
    def fn():
        rid = tf.distribute.get_replica_context().replica_id_in_sync_group
        bad = tf.logical_and(overflow_on_replica_1, tf.equal(rid, 1))
        opt.apply([tf.where(bad, tf.constant([np.inf, 8.0]), tf.constant([8.0, 8.0]))], [v])
    strategy.run(fn)

def values():
    return [x.numpy().tolist() for x in strategy.experimental_local_results(v)]

step(tf.constant(True))
r = {"after_overflow": values(), "iterations": [int(opt.iterations.numpy())],
     "scale": float(opt.dynamic_scale.numpy())}
step(tf.constant(False))
r["after_finite"] = values()
r["iterations"].append(int(opt.iterations.numpy()))
print("RESULT", json.dumps(r))
"""


def test_loss_scaling_skips_on_every_replica_together_and_a_skipped_step_counts(data):
    """Keras 3 decides per replica, before the gradients are summed: one GPU's overflow made
    the summed Inf reach the weights. And its skipped step did not advance the counter that
    is the trainer's step (r, z, the input's place on resume)."""
    import json
    import subprocess
    import sys

    from hagan_tf.optimizers import Adam, LossScaleOptimizer

    # Its own process: MirroredStrategy instances in one process share collective keys, and
    # an earlier test's gradient all-reduce (another shape) would meet this one's.
    out = subprocess.run([sys.executable, "-c", _LSO_REPLICAS], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": "",
                                           "TF_CPP_MIN_LOG_LEVEL": "2"})
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["after_overflow"] == [[1.0, 1.0]] * 2  # every replica skipped, none applied Inf
    assert r["iterations"] == [1, 2] and r["scale"] == 4.0  # the skipped step counted
    assert r["after_finite"][0] == r["after_finite"][1] and max(r["after_finite"][0]) < 1.0

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:  # an overflowing scale, as at the start of a run: every step skips D's update
        gan = HAGAN(tiny(mixed_precision="mixed_float16"))
        gan.compile(d_optimizer=LossScaleOptimizer(Adam(4e-4, beta_1=0.0), initial_scale=2.0**60),
                    g_optimizer=keras.optimizers.LossScaleOptimizer(Adam(1e-4, beta_1=0.0)))
        assert isinstance(gan.g_optimizer, LossScaleOptimizer)  # Keras's own gets both fixes too
        ds = make_dataset(data, 2, size=32).map(lambda r: r["volume"])
        gan.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)
        assert float(gan.d_optimizer.dynamic_scale.numpy()) < 2.0**60  # it did skip
        assert int(gan.step.numpy()) == 3
        assert [int(o.iterations.numpy()) for o in (gan.g_optimizer, gan.d_optimizer,
                                                    gan.eh_optimizer, gan.eg_optimizer)] == [3] * 4
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_adam_without_first_moment_slot_matches_keras_adam():
    from hagan_tf.optimizers import Adam

    grads = [tf.random.stateless_normal((3, 4), [i, 0]) for i in range(5)]
    for beta_1, slots in ((0.0, 1), (0.5, 2)):
        ours, ref = Adam(1e-2, beta_1=beta_1), keras.optimizers.Adam(1e-2, beta_1=beta_1)
        w_ours, w_ref = keras.Variable(tf.ones((3, 4))), keras.Variable(tf.ones((3, 4)))
        ours.build([w_ours])
        ref.build([w_ref])
        # one slot per weight when beta_1 == 0 (m would equal the gradient), two otherwise
        assert len(ours.variables) - 2 == slots * 1 and len(ref.variables) - 2 == 2
        for g in grads:
            ours.apply_gradients([(g, w_ours)])
            ref.apply_gradients([(g, w_ref)])
        assert not np.allclose(w_ours.numpy(), 1.0)
        np.testing.assert_allclose(w_ours.numpy(), w_ref.numpy(), rtol=1e-6, atol=1e-6)


class _FixedDraws(HAGAN):
    """Fixed r and z: XLA's Philox kernels draw another stream than TF's for the same seed."""

    def draw_z(self, step, n, stream):
        i = tf.cast(tf.range(n * self.config.latent_dim), tf.float32)
        return tf.reshape(tf.sin(1.7 * i + tf.cast(stream + step, tf.float32)),
                          (n, self.config.latent_dim))

    def draw_crop(self, step):
        return tf.constant(8)


def test_xla_compiled_steps_equal_graph_steps(data):
    """jit_compile=True compiles the whole iteration (static slab shapes, `layers.depth_slab`)
    and, given the same r and z, two XLA iterations log what two graph iterations log."""
    ds = make_dataset(data, 2, size=32).map(lambda r: {"volume": r["volume"]})
    batch = next(iter(ds))
    logs = []
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        gan = _FixedDraws(tiny(jit_compile=jit))
        gan.compile()
        logs.append([gan.train_on_batch(batch, return_dict=True) for _ in range(2)])
    for graph, xla in zip(*logs):
        assert graph.keys() == xla.keys()
        assert all(np.isfinite(v) for v in xla.values()), xla  # (allclose lets NaN equal NaN)
        for k in graph:
            np.testing.assert_allclose(xla[k], graph[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_xla_compiles_the_iteration_once(data):
    """The compiled step must not depend on the iteration counter's value. r is drawn from it,
    and tf.slice made r, so the counter, a compile-time constant: XLA compiled every
    iteration anew (58 s per 32^3 iteration on CPU, against 5 s compiled once)."""
    batch = next(iter(make_dataset(data, 2, size=32).map(lambda r: {"volume": r["volume"]})))
    gan = HAGAN(tiny(jit_compile=True))
    gan.compile()
    step = tf.function(gan.train_step, jit_compile=True)
    hlo = []
    for i in (0, 1):
        gan.d_optimizer.iterations.assign(i)  # gan.step; lowering to HLO only, nothing runs
        hlo.append(step.experimental_get_compiler_ir(batch)(stage="hlo"))
    assert hlo[0] == hlo[1]


@pytest.mark.filterwarnings("ignore:Your input ran out of data")  # what this test makes happen
def test_flat_train_function_equals_keras_nested_one_and_stops_at_end_of_data(data):
    """HAGAN traces the iteration as one tf.function (Keras nests two): same weights after the
    same steps, and fit() still ends an epoch cleanly when a finite dataset runs out."""
    ds = make_dataset(data, 2, size=32, shuffle=0, repeat=False).map(lambda r: {"volume": r["volume"]})
    n_batches = sum(1 for _ in ds)
    assert n_batches >= 2
    weights = []
    for nested in (False, True):
        keras.utils.set_random_seed(0)
        gan = HAGAN(tiny())
        gan.compile()
        if nested:
            keras.Model.make_train_function(gan)  # Keras's own two nested functions
        history = gan.fit(ds, epochs=2, verbose=0).history
        assert int(gan.step) == 2 * n_batches and len(history["g_loss"]) == 2
        weights.append(_snapshot(gan.trainable_variables))
    for flat, nested in zip(*weights):
        np.testing.assert_allclose(flat, nested, rtol=1e-5, atol=1e-6)


def test_top_ops_reads_the_op_types_of_a_profiled_function(tmp_path):
    from hagan_tf.training.callbacks import profile_traces, top_ops

    a = tf.random.stateless_normal((256, 256), [1, 2])

    @tf.function
    def f(a):
        return tf.reduce_sum(tf.matmul(a, a)) + tf.reduce_sum(tf.nn.relu(a))

    f(a)
    tf.profiler.experimental.start(str(tmp_path))
    for _ in range(3):
        f(a).numpy()
    tf.profiler.experimental.stop()
    rows = top_ops(profile_traces(str(tmp_path)), 50)
    kinds = {name: count for name, _, count in rows}
    matmuls = kinds.get("MatMul", kinds.get("_MklMatMul"))  # the latter where TF runs oneDNN
    assert matmuls == 3 and kinds.get("Relu") == 3, rows
    assert all(ms >= 0 for _, ms, _ in rows)


def test_cli_profiles_the_steps_asked_for(data, tmp_path, capsys):
    from hagan_tf.training.callbacks import profile_traces

    run = str(tmp_path / "run")
    rc = train_main(["--config", "tiny_32", "--data", data, "--out", run, "--max-steps", "3",
                     "--strategy", "default", "--no-progress", "--profile-steps", "2", "3"])
    assert rc == 0
    assert len(profile_traces(os.path.join(run, "tensorboard"))) == 1
    err = capsys.readouterr().err
    assert "profiled steps 2-3: op types by time" in err
    table = err[err.index("profiled steps 2-3"):].splitlines()[2:]
    counts = {line.split()[0]: int(line.split()[-1]) for line in table if line.strip()}
    assert any("Conv3D" in op and n > 0 for op, n in counts.items()), err[-3000:]
    rc = train_main(["--config", "tiny_32", "--data", data, "--out", run, "--max-steps", "4",
                     "--strategy", "default", "--no-progress", "--profile-steps", "2", "3"])
    assert rc == 0 and "profile steps 2-3: none of them ran" in capsys.readouterr().err  # resumed at 3
    rc = train_main(["--config", "tiny_32", "--data", data, "--out", str(tmp_path / "r2"),
                     "--profile-steps", "3", "2"])
    assert rc == 2 and "1 <= FIRST <= LAST" in capsys.readouterr().err


def test_training_process_imports_tensorflow_without_sklearn_and_matplotlib():
    # Keras imports both for optional integrations (~60 MB of heap); hagan-train skips them,
    # and they stay importable for whoever needs them later in the process.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import hagan_tf.training.cli\n"
        "from hagan_tf.training import import_tensorflow_lean\n"
        "assert 'tensorflow' in sys.modules and 'keras' in sys.modules\n"
        "assert 'sklearn' not in sys.modules and 'matplotlib' not in sys.modules, sys.modules.keys()\n"
        "assert import_tensorflow_lean() is False\n"
        "import sklearn.linear_model, matplotlib\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


def test_layout_optimizer_is_turned_off_only_with_a_gpu(monkeypatch):
    # On a GPU the layout optimizer wraps each cuDNN convolution in NDHWC<->NCDHW transposes.
    from hagan_tf.training import keep_channels_last_on_gpu

    before = tf.config.optimizer.get_experimental_options()
    try:
        assert keep_channels_last_on_gpu() is False  # the tests see no GPU
        assert tf.config.optimizer.get_experimental_options() == before
        monkeypatch.setattr(tf.config, "list_physical_devices",
                            lambda kind=None: ["/physical_device:GPU:0"] if kind == "GPU" else [])
        assert keep_channels_last_on_gpu() is True
        assert tf.config.optimizer.get_experimental_options()["layout_optimizer"] is False
    finally:
        tf.config.optimizer.set_experimental_options({"layout_optimizer": before.get("layout_optimizer", True)})
