"""Exact tiled decoding: the generator's full-resolution stages slab by slab, in bounded memory.

Decoding the whole feature map at once holds every stage of G^H at full size: at 512^3 its
first layer alone is 2 GiB at half resolution and its upsampled input 4 GiB. Here the stages
after G^A's second-to-last block (G^A's last block, G^H's two) run as one chain that streams
along the depth axis: each step computes a few new rows of every stage, each from the rows the
stage below holds, and every stage keeps only the rows the next step still reads (its newest
rows and a halo of one row per 3^3 convolution). Each row of each stage is computed once per
pass, exactly: the convolutions pad height and width as 'same' does and read real rows in
depth (zero rows only at the volume's faces), so the result equals the whole-volume decode.

GroupNorm needs the whole volume's statistics. A first pass per normalised block streams up to
that block's convolution and accumulates per-group moments in float64; the next passes
normalise with them. So G^A's last convolution runs three times and G^H's first twice (about
twice the multiply-adds of a whole decode), for memory that no longer grows with S^3 beyond
the held input, the (S/8)^3 map, and the output itself.

The slab (`tile_depth`: output slices per step) is bounded by voxels by default: `auto_tile_depth`
gives TILE_VOXELS output voxels per step at every size, so the stages' rows in memory do not
grow with S^2 either.

Eagerly, the output is written into one preallocated array, step by step (`decode`). Inside a
tf.function (the SavedModel's signatures) the steps run in a tf.while_loop that carries the
held rows and gathers the output in a TensorArray, which TF Serving runs like any other graph.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from .config import G_OUTPUTS as TANH_POSTS
from .conv_rewrites import _PARITIES, interleave_parities, parity_kernels
from .lean_ops import channel_sums

# Output voxels per step of the default ('auto') slab: 32 slices of 256^2 (see
# benchmarks/RESULTS.md, "Beyond 256^3").
TILE_VOXELS = 32 * 256 * 256


def auto_tile_depth(size: int) -> int:
    """The default slab depth at output size S: TILE_VOXELS / S^2 slices (32 at 256^3, 8 at
    512^3; at 128^3 and below a whole volume, decoded at once)."""
    return max(1, TILE_VOXELS // (size * size))


def _needed(block, lo: int, hi: int, depth_in: int) -> tuple[int, int]:
    """Input rows [a, b) that output rows [lo, hi) of a 'same' 3^3 block read (after its
    optional nearest x2 upsampling), clipped to the input's depth."""
    if block.upsample:
        return max((lo - 1) // 2, 0), min(hi // 2 + 1, depth_in)
    return max(lo - 1, 0), min(hi + 1, depth_in)


class Chain:
    """ConvBlocks streamed along depth from a held input of `depth` rows; see the module doc.
    Level 0 is the input, level l block l-1's output."""

    def __init__(self, blocks, depth: int):
        self.blocks = list(blocks)
        for b in self.blocks:
            if (b.kernel_size, b.strides, b.padding) != (3, 1, "same"):
                raise ValueError(f"{b.name}: only 3^3 stride-1 'same' blocks decode by slabs")
        self.depths = [depth]  # rows of each level
        for b in self.blocks:
            self.depths.append(self.depths[-1] * (2 if b.upsample else 1))
        self._kernels = {}

    def step_rows(self, tile_depth: int) -> int:
        """Rows of level 1 computed per step for `tile_depth` slices of the chain's output."""
        return max(1, tile_depth * self.depths[1] // self.depths[-1])

    def shape(self, level: int, width: int) -> list[int]:
        """[H, W, C] of level `level` (level >= 1) for an input `width` voxels wide."""
        scale = self.depths[level] // self.depths[0]
        return [width * scale, width * scale, self.blocks[level - 1].filters]

    def plan(self, top: int, rows: int) -> np.ndarray:
        """[steps, top + 2, 3] int32, the steps of a pass through blocks 0..top, `rows` new rows
        of level 1 per step. Per step, level 0: (a, b, 0), the input rows block 0 reads; level
        l >= 1: (c, e, keep), the rows [c, e) computed in this step and, for l <= top, how many
        of level l's last rows the next step reads again (its halo). Level l's rows in a step,
        those kept from the step before and the new, are exactly the rows block l reads. Every
        step computes rows at every level (a first step too short for that is lengthened)."""
        depths, last = self.depths, top + 1
        done = [depths[0]] + [0] * last  # rows computed per level
        steps, starts = [], []  # starts: per step, the first row of each level that block reads
        rows += rows % 2 if self.blocks[0].upsample else 0  # upsampled rows come in pairs
        while done[last] < depths[last]:
            n = rows
            while True:  # where each level can get to once level 1 has n more rows
                ends = [depths[0], min(done[1] + n, depths[1])]
                for level in range(2, last + 1):
                    below, full = ends[level - 1], ends[level - 1] == depths[level - 1]
                    reach = 2 * (below - 1) if self.blocks[level - 1].upsample else below - 1
                    ends.append(depths[level] if full else max(reach, 0))
                if all(ends[level] > done[level] for level in range(1, last + 1)):
                    break
                n += rows
            reads = [_needed(self.blocks[level], done[level + 1], ends[level + 1], depths[level])
                     for level in range(last)]
            for level in range(1, last):  # what level reads this step: kept rows, then new
                assert reads[level][1] == ends[level] and reads[level][0] <= done[level]
                assert not starts or starts[-1][level] <= reads[level][0]
            steps.append([reads[0] + (0,)] + [(done[level], ends[level], 0) for level in range(1, last + 1)])
            starts.append([r[0] for r in reads])
            done = ends
        plan = np.asarray(steps, np.int32)
        for t in range(len(steps) - 1):  # keep = rows from the next step's first read on
            for level in range(1, last):
                plan[t, level, 2] = plan[t, level, 1] - starts[t + 1][level]
        return plan

    def rows(self, i: int, h, pad_lo, pad_hi, stats=None):
        """Block i's output rows for input rows h: the rows whose 3^3 window lies in h, plus its
        first and last row where pad_lo / pad_hi (the volume's faces); normalised and activated
        unless `stats` is None. One operation at a time, each result replacing the last, so
        that no more than two copies of the rows are alive."""
        block = self.blocks[i]
        h = tf.pad(h, [[0, 0], [pad_lo, pad_hi], [1, 1], [1, 1], [0, 0]])
        if block.upsample and block.filters >= 8:  # one 2^3 conv per output parity
            k, half = self.parity_kernels(i), (slice(None, -1), slice(1, None))
            y = tf.concat([tf.nn.conv3d(h[:, half[p], half[q], half[r]], k[p, q, r], [1] * 5,
                                        "VALID") for p, q, r in _PARITIES], -1)
        else:  # a 3^3 conv (for fewer than 8 upsampled outputs, the parities as channels)
            k = self.parity_kernels(i) if block.upsample else tf.cast(block.conv.kernel, tf.float32)
            y = tf.nn.conv3d(h, k, [1] * 5, "VALID")
        del h
        if block.upsample:  # output 2j + p from input rows j - 1 + p, j + p
            y = interleave_parities(y, block.filters)
        y = y + tf.cast(block.conv.bias, tf.float32)
        if stats is None:
            return y
        if block.post == "gn_relu":  # in GroupNorm's order of arithmetic
            mean, scale, offset = stats[i]
            y = y - mean
            y = y * scale
            y = y + offset
            return tf.nn.relu(y)
        if block.post in TANH_POSTS:
            return block.unmap(tf.tanh(y))
        return y

    def parity_kernels(self, i: int):
        """Block i's upsampling kernel per output parity (conv_rewrites.parity_kernels), derived
        once per decode."""
        if i not in self._kernels:
            self._kernels[i] = parity_kernels(tf.cast(self.blocks[i].conv.kernel, tf.float32))
        return self._kernels[i]

    def stream(self, x, top: int, rows: int, stats, emit, acc, raw: bool = False):
        """One pass through blocks 0..top; emit(acc, y, t, c, e) takes step t's new rows [c, e)
        of block top's output (before its normalisation where `raw`) and returns the new acc."""
        plan, depths = self.plan(top, rows), self.depths
        batch = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]  # static where known
        for i in range(top + 1):  # derived once, outside the loop
            if self.blocks[i].upsample:
                self.parity_kernels(i)
        kept = [tf.zeros([batch, 0] + self.shape(level, x.shape[2]), tf.float32)
                for level in range(1, top + 1)]

        def body(t, state):
            kept, acc = state
            kept, r = list(kept), _rows(plan, t)
            h = x[:, r[0][0]:r[0][1]]
            for level in range(1, top + 2):
                c, e, keep = r[level]
                y = self.rows(level - 1, h, _flag(c == 0), _flag(e == depths[level]),
                              None if raw and level == top + 1 else stats)
                if level == top + 1:
                    return kept, emit(acc, y, t, c, e)
                h = tf.concat([kept[level - 1], y], 1)  # the rows block `level` reads
                del y
                kept[level - 1] = h[:, tf.shape(h)[1] - keep:]  # the next step's halo
        return _loop(len(plan), body, (kept, acc))[1]

    def _moments(self, h, block, batch):
        """[B, groups, 2]: the rows' per-group mean and sum of squared deviations, two-pass
        and summed axis by axis as GroupNorm's own (one float32 reduction over a whole slab
        puts ~3e-4 on a variance); combined across steps in float64."""
        groups, channels = block.norm.groups, h.shape[-1]
        per = channels // groups
        n = tf.cast(tf.reduce_prod(tf.shape(h)[1:4]) * per, tf.float32)

        def group_sums(x):  # [B, D, H, W, C] -> [B, groups]
            return tf.reduce_sum(tf.reshape(channel_sums(x), [batch, groups, per]), -1)
        mean = group_sums(h) / n
        m2 = group_sums(tf.math.squared_difference(h, _per_channel(mean, per, channels)))
        return tf.stack([tf.cast(mean, tf.float64), tf.cast(m2, tf.float64)], -1), tf.cast(n, tf.float64)

    @staticmethod
    def _combine(state, moments):
        """Chan et al.'s pairwise update of (count, mean, M2): exact in any order."""
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

    def statistics(self, x, rows: int) -> dict:
        """GroupNorm statistics of every normalised block, one pass each, in order."""
        stats = {}
        batch = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]  # static where known
        for i, block in enumerate(self.blocks):
            if block.post != "gn_relu":
                continue
            init = (tf.constant(0.0, tf.float64), tf.zeros([batch, block.norm.groups, 2], tf.float64))

            def emit(state, y, t, c, e, block=block):
                return self._combine(state, self._moments(y, block, batch))
            stats[i] = self._stats(self.stream(x, i, rows, stats, emit, init, raw=True), i)
        return stats


def _per_channel(g, per: int, channels: int):
    """[B, groups] -> [B, 1, 1, 1, C] float32, each group's value on its channels."""
    return tf.reshape(tf.repeat(tf.cast(g, tf.float32), per, axis=1), [-1, 1, 1, 1, channels])


def _flag(b):
    """1 where b (a Python or a traced bool), else 0."""
    return int(b) if isinstance(b, (bool, np.bool_)) else tf.cast(b, tf.int32)


def _rows(plan: np.ndarray, t):
    """The plan's rows for step t: Python ints eagerly, tensors in a graph loop."""
    if isinstance(t, int):
        return [tuple(int(v) for v in r) for r in plan[t]]
    r = tf.gather(tf.constant(plan), t)
    return [(r[i, 0], r[i, 1], r[i, 2]) for i in range(plan.shape[1])]


def _loop(n: int, body, state):
    """state = body(t, state) for t in 0..n-1: a Python loop eagerly, a tf.while_loop traced
    (held rows change depth from step to step)."""
    if tf.executing_eagerly():
        for t in range(n):
            state = body(t, state)
        return state

    def invariant(v):
        if isinstance(v, tf.TensorArray):
            return tf.TensorShape(None)
        return tf.TensorShape([v.shape[0], None] + v.shape[2:].as_list()) if v.shape.rank == 5 else v.shape
    return tf.while_loop(lambda t, s: t < n, lambda t, s: (t + 1, body(t, s)),
                         (tf.constant(0), state), parallel_iterations=1,
                         shape_invariants=(tf.TensorShape([]), tf.nest.map_structure(invariant, state)))[1]


def decode(blocks, x, tile_depth: int, out=None):
    """The blocks' output for held input x [B, D, H, W, C] (a tensor, or eagerly a NumPy array,
    kept as it is), computed `tile_depth` output slices at a time. Eagerly, each step's rows go into `out` as they arrive (`out[:, c:e] = rows`, c
    increasing): a new NumPy array if None, else any array-like taking that assignment, e.g.
    io.NiftiVolumes, which writes them to files so that the output is never whole in memory;
    `out` is returned. Inside a tf.function a tensor (`out` must be None)."""
    if tf.executing_eagerly() and isinstance(x, np.ndarray):
        x = np.asarray(x, np.float32)  # sliced step by step: no whole copy as a tensor
    else:
        x = tf.cast(x, tf.float32)
    chain = Chain(blocks, x.shape[1])
    rows = chain.step_rows(tile_depth)
    stats = chain.statistics(x, rows)
    last = len(chain.blocks) - 1
    if tf.executing_eagerly():
        if out is None:
            out = np.empty([x.shape[0], chain.depths[-1]] + chain.shape(last + 1, x.shape[2]),
                           np.float32)

        def write(_, y, t, c, e):
            out[:, c:e] = y.numpy()
        chain.stream(x, last, rows, stats, write, None)
        return out
    if out is not None:
        raise ValueError("a traced decode returns its output: out must be None")
    steps = len(chain.plan(last, rows))
    slabs = chain.stream(x, last, rows, stats, lambda ta, y, t, c, e: ta.write(
        t, tf.transpose(y, [1, 0, 2, 3, 4])), tf.TensorArray(tf.float32, steps, infer_shape=False))
    out = tf.transpose(slabs.concat(), [1, 0, 2, 3, 4])
    out.set_shape([x.shape[0], chain.depths[-1]] + chain.shape(last + 1, x.shape[2]))
    return out
