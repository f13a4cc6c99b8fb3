"""The benchmarks' own helpers: what they report must come from what ran."""

import importlib.util
import os

import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))


def _train_step_module():
    spec = importlib.util.spec_from_file_location(
        "bench_train_step", os.path.join(HERE, "..", "benchmarks", "train_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_top_ops_reads_the_op_types_of_a_profiled_function(tmp_path):
    bench = _train_step_module()
    a = tf.random.stateless_normal((256, 256), [1, 2])

    @tf.function
    def f(a):
        return tf.reduce_sum(tf.matmul(a, a)) + tf.reduce_sum(tf.nn.relu(a))

    f(a)
    tf.profiler.experimental.start(str(tmp_path))
    for _ in range(3):
        f(a).numpy()
    tf.profiler.experimental.stop()
    rows = bench.top_ops(str(tmp_path), 50)
    kinds = {name: count for name, _, count in rows}
    matmuls = kinds.get("MatMul", kinds.get("_MklMatMul"))  # the latter where TF runs oneDNN
    assert matmuls == 3 and kinds.get("Relu") == 3, rows
    assert all(ms >= 0 for _, ms, _ in rows)
