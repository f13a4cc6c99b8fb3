"""Exact tiled decoding: the generator's full-resolution stages slab by slab, in bounded memory.

Decoding the whole feature map at once holds every stage of G^H at full size: at 512^3 its
first layer alone is 2 GiB at half resolution and its upsampled input 4 GiB. Here the stages
after G^A's second-to-last block (G^A's last block, G^H's two) run as one chain over slabs of
output slices. Each slab reads the rows its receptive field needs (a halo of one row per 3^3
convolution), so it equals the whole-volume decode wherever its halo is inside the volume, and
at the volume's faces the slab's own zero padding is the volume's.

GroupNorm needs the whole volume's statistics. A first pass per normalised block computes that
block's convolution slab by slab and accumulates per-group sums in float64; the next passes
normalise with them. So G^A's last convolution runs three times and G^H's first twice: about
twice the multiply-adds of a whole decode, for memory that no longer grows with S^3 beyond the
input (S/8)^3 map and the output itself.

Eagerly, the output is written into one preallocated array, slab by slab (`decode`). Inside a
tf.function (the SavedModel's signatures) the slabs run in a tf.while_loop and are gathered in
a TensorArray, which TF Serving runs like any other graph.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from .conv_rewrites import upsample_conv3d
from .lean_ops import channel_sums

# The default slab depth, in output slices (see benchmarks/RESULTS.md, "Tiled decoding").
DEFAULT_TILE_DEPTH = 32


def _needed(block, lo: int, hi: int, depth_in: int) -> tuple[int, int]:
    """Input rows [a, b) that output rows [lo, hi) of a 'same' 3^3 block read (after its
    optional nearest x2 upsampling), clipped to the input's depth."""
    if block.upsample:
        return max((lo - 1) // 2, 0), min(hi // 2 + 1, depth_in)
    return max(lo - 1, 0), min(hi + 1, depth_in)


class Chain:
    """ConvBlocks run slab by slab from a held input of `depth` rows; see the module doc."""

    def __init__(self, blocks, depth: int):
        self.blocks = list(blocks)
        for b in self.blocks:
            if (b.kernel_size, b.strides, b.padding) != (3, 1, "same"):
                raise ValueError(f"{b.name}: only 3^3 stride-1 'same' blocks decode by slabs")
        self.depths = [depth]  # rows at the input and after each block
        for b in self.blocks:
            self.depths.append(self.depths[-1] * (2 if b.upsample else 1))

    def plan(self, upto: int, tile: int) -> np.ndarray:
        """[tiles, upto + 2, 2] int32: for each slab of block `upto`'s output rows, the rows
        each level must hold, from the input (level 0) to that output (level upto + 1)."""
        out_depth = self.depths[upto + 1]
        rows = []
        for lo in range(0, out_depth, tile):
            need = [(lo, min(lo + tile, out_depth))]
            for i in range(upto, -1, -1):
                need.append(_needed(self.blocks[i], *need[-1], self.depths[i]))
            rows.append(need[::-1])
        return np.asarray(rows, np.int32)

    def tile_rows(self, upto: int, tile_depth: int) -> int:
        """Slab depth at block `upto`'s output for `tile_depth` slices of the chain's output."""
        return max(1, tile_depth * self.depths[upto + 1] // self.depths[-1])

    def run(self, x, rows, stats, upto: int, raw: bool = False):
        """Block `upto`'s output rows rows[upto + 1] from input rows rows[0] of x; `raw` stops
        before its normalisation (the statistics pass)."""
        h = x[:, rows[0][0]:rows[0][1]]
        have = rows[0]
        for i in range(upto + 1):
            block = self.blocks[i]
            kernel = tf.cast(block.conv.kernel, tf.float32)
            if block.upsample:  # never the 8x upsampled tensor, whatever the platform
                h = upsample_conv3d(h, kernel)
                have = (2 * have[0], 2 * have[1])
            else:
                h = tf.nn.conv3d(h, kernel, [1] * 5, "SAME")
            h = h + tf.cast(block.conv.bias, tf.float32)
            want = rows[i + 1]
            h = h[:, want[0] - have[0]:want[1] - have[0]]
            have = want
            if i == upto and raw:
                return h
            if block.post == "gn_relu":
                mean, scale, offset = stats[i]
                h = tf.nn.relu((h - mean) * scale + offset)
            elif block.post in ("tanh", "tanh_st"):
                h = tf.tanh(h)
        return h

    def _moments(self, h, block, batch):
        """[B, groups, 2]: the slab's per-group mean and sum of squared deviations, two-pass
        and summed axis by axis as GroupNorm's own (one float32 reduction over a whole slab
        puts ~3e-4 on a variance); combined across slabs in float64."""
        groups, channels = block.norm.groups, h.shape[-1]
        per = channels // groups
        n = tf.cast(tf.reduce_prod(tf.shape(h)[1:4]) * per, tf.float32)

        def group_sums(x):  # [B, D, H, W, C] -> [B, groups]
            return tf.reduce_sum(tf.reshape(channel_sums(x), [batch, groups, per]), -1)
        mean = group_sums(h) / n
        m2 = group_sums(tf.square(h - _per_channel(mean, per, channels)))
        return tf.stack([tf.cast(mean, tf.float64), tf.cast(m2, tf.float64)], -1), tf.cast(n, tf.float64)

    @staticmethod
    def _combine(state, moments):
        """Chan et al.'s pairwise update of (count, mean, M2): exact in any slab order."""
        (n_a, acc), (m, n_b) = state, moments
        n = n_a + n_b
        delta = m[..., 0] - acc[..., 0]
        mean = acc[..., 0] + delta * (n_b / n)
        m2 = acc[..., 1] + m[..., 1] + tf.square(delta) * (n_a * n_b / n)
        return n, tf.stack([mean, m2], -1)

    def _stats(self, state, i: int):
        """Per-channel mean, scale and offset of block i's GroupNorm: y = (x - mean) * scale + offset,
        the order of GroupNorm's own arithmetic."""
        block = self.blocks[i]
        n, acc = state
        channels, groups = block.filters, block.norm.groups
        inv = tf.math.rsqrt(acc[..., 1] / n + block.norm.epsilon)

        per = channels // groups
        return (_per_channel(acc[..., 0], per, channels),
                _per_channel(inv, per, channels) * tf.cast(block.norm.gamma, tf.float32),
                tf.cast(block.norm.beta, tf.float32))

    def statistics(self, x, tile_depth: int) -> dict:
        """GroupNorm statistics of every normalised block, one pass each, in order."""
        stats = {}
        for i, block in enumerate(self.blocks):
            if block.post != "gn_relu":
                continue
            plan = self.plan(i, self.tile_rows(i, tile_depth))
            batch = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]  # static where known
            init = (tf.constant(0.0, tf.float64), tf.zeros([batch, block.norm.groups, 2], tf.float64))

            def body(t, state, i=i, block=block, plan=plan):
                slab = self.run(x, _rows(plan, t), stats, i, raw=True)
                return self._combine(state, self._moments(slab, block, batch))
            stats[i] = self._stats(_loop(len(plan), body, init), i)
        return stats


def _per_channel(g, per: int, channels: int):
    """[B, groups] -> [B, 1, 1, 1, C] float32, each group's value on its channels."""
    return tf.reshape(tf.repeat(tf.cast(g, tf.float32), per, axis=1), [-1, 1, 1, 1, channels])


def _rows(plan: np.ndarray, t):
    """The plan's rows for slab t: Python ints eagerly, tensors in a graph loop."""
    if isinstance(t, int):
        return [tuple(int(v) for v in r) for r in plan[t]]
    r = tf.gather(tf.constant(plan), t)
    return [(r[i, 0], r[i, 1]) for i in range(plan.shape[1])]


def _loop(n: int, body, state):
    """state = body(t, state) for t in 0..n-1: a Python loop eagerly, a tf.while_loop traced."""
    if tf.executing_eagerly():
        for t in range(n):
            state = body(t, state)
        return state
    return tf.while_loop(lambda t, s: t < n, lambda t, s: (t + 1, body(t, s)),
                         (tf.constant(0), state), parallel_iterations=1)[1]


def decode(blocks, x, tile_depth: int = DEFAULT_TILE_DEPTH):
    """The blocks' output for held input x [B, D, H, W, C], computed slab by slab: a NumPy
    array eagerly (one buffer, written as the slabs arrive), a tensor inside a tf.function."""
    x = tf.cast(x, tf.float32)
    chain = Chain(blocks, x.shape[1])
    stats = chain.statistics(x, tile_depth)
    last = len(chain.blocks) - 1
    plan = chain.plan(last, chain.tile_rows(last, tile_depth))
    if tf.executing_eagerly():
        out = None
        for t in range(len(plan)):
            rows = _rows(plan, t)
            slab = chain.run(x, rows, stats, last).numpy()
            if out is None:
                out = np.empty((slab.shape[0], chain.depths[-1]) + slab.shape[2:], slab.dtype)
            out[:, rows[-1][0]:rows[-1][1]] = slab
        return out
    slabs = tf.TensorArray(tf.float32, size=len(plan), infer_shape=False)
    slabs = _loop(len(plan), lambda t, ta: ta.write(t, tf.transpose(
        chain.run(x, _rows(plan, t), stats, last), [1, 0, 2, 3, 4])), slabs)
    out = tf.transpose(slabs.concat(), [1, 0, 2, 3, 4])
    scale = chain.depths[-1] // chain.depths[0]
    out.set_shape([x.shape[0], chain.depths[-1], x.shape[2] * scale, x.shape[3] * scale,
                   chain.blocks[-1].filters])
    return out
