"""The reference HA-GAN networks in PyTorch, as the authors' code builds them (docs/architecture.md).

Only the tests use this: it fixes the published state-dict names and shapes (channels-first,
layers numbered by position, BigGAN-style spectral norm with buffers u0/sv0) and gives the
forward passes our imported networks must reproduce. S is 128 or 256 as published, or any power
of two from 32 to 512 (with `width` < 1 for small test models), generalised as hagan_tf/models.py
is: the 4^3 stride-2 chains of D^H (log2(S/32) convs), D^L and E^G (log2(S/16) each) lose their
first layers as S shrinks and the remaining names keep their numbers (at 128 D^H starts at conv2),
and G^A doubles 4^3 up to S/4. `width` scales every hidden channel count as
HAGANConfig.channels does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _SN:
    """One power iteration from u0 per forward; u0 (and the logged sv0) change only in training."""

    def _init_sn(self, out):
        self.register_buffer("u0", torch.randn(1, out))
        self.register_buffer("sv0", torch.ones(1))

    def sn_weight(self):
        w = self.weight.view(self.weight.shape[0], -1)
        with torch.no_grad():
            v = F.normalize(self.u0 @ w, eps=1e-12)
            u = F.normalize(v @ w.t(), eps=1e-12)
        sigma = torch.squeeze(v @ w.t() @ u.t())
        if self.training:
            with torch.no_grad():
                self.u0[:] = u
                self.sv0[:] = sigma
        return self.weight / sigma


class SNConv3d(nn.Conv3d, _SN):
    def __init__(self, *args, **kwargs):
        nn.Conv3d.__init__(self, *args, **kwargs)
        self._init_sn(self.out_channels)

    def forward(self, x):
        return F.conv3d(x, self.sn_weight(), self.bias, self.stride, self.padding)


class SNLinear(nn.Linear, _SN):
    def __init__(self, *args, **kwargs):
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_sn(self.out_features)

    def forward(self, x):
        return F.linear(x, self.sn_weight(), self.bias)


def _conv3(cin, cout):
    return nn.Conv3d(cin, cout, 3, 1, 1)


def _gn_relu(norm, x):
    return F.relu(norm(x))


def _log2(x):
    n = int(round(math.log2(x)))
    if 2 ** n != x:
        raise ValueError(f"{x} is not a power of two")
    return n


def channels(width=1.0):
    """c -> c scaled by `width`, kept a multiple of 8 for GroupNorm(8) (HAGANConfig.channels)."""
    if width == 1.0:
        return lambda c: c
    return lambda c: max(8, 8 * int(round(c * width / 8)))


def _chain(n, last):
    """Channels of a chain of n stride-2 convs ending at `last`, halving towards the input."""
    return [last // 2 ** (n - 1 - i) for i in range(n)]


class SubGenerator(nn.Module):  # G^L
    def __init__(self, width=1.0):
        super().__init__()
        ch = channels(width)
        self.tp_conv1, self.bn1 = _conv3(ch(64), ch(32)), nn.GroupNorm(8, ch(32))
        self.tp_conv2, self.bn2 = _conv3(ch(32), ch(16)), nn.GroupNorm(8, ch(16))
        self.tp_conv3 = _conv3(ch(16), 1)

    def forward(self, a):
        h = _gn_relu(self.bn1, self.tp_conv1(a))
        h = _gn_relu(self.bn2, self.tp_conv2(h))
        return torch.tanh(self.tp_conv3(h))


COMMON = (512, 512, 256, 128, 64)  # G^A's convs tp_conv1..5 (models.COMMON_CHANNELS)


class Generator(nn.Module):  # G^A (fc1, tp_conv1..5) + G^H (tp_conv6..7) + G^L (sub_G)
    def __init__(self, size, latent_dim=1024, num_class=0, width=1.0):
        super().__init__()
        self.size = size
        ch = channels(width)
        self.c0 = ch(COMMON[0])
        self.fc1 = nn.Linear(latent_dim + num_class, 4 * 4 * 4 * self.c0)
        chans = [ch(c) for c in (COMMON[0],) + COMMON + (32,)]
        for i in range(1, 7):
            setattr(self, f"tp_conv{i}", _conv3(chans[i - 1], chans[i]))
            setattr(self, f"bn{i}", nn.GroupNorm(8, chans[i]))
        self.tp_conv7 = _conv3(chans[6], 1)
        self.sub_G = SubGenerator(width)
        # G^A doubles 4^3 up to S/4: log2(S/16) doublings, before tp_conv2.. (the last convs
        # run without one at S <= 128; before tp_conv1 too at S = 512)
        n_up = _log2(size // 16)
        self.upsample = [min(1, 5 - n_up) <= i - 1 <= n_up for i in range(1, 6)]

    def common(self, z, onehot=None):
        """A = G^A(z) [B, 64, S/4, S/4, S/4] (channels scaled by width)."""
        h = self.fc1(z if onehot is None else torch.cat([z, onehot], 1)).view(-1, self.c0, 4, 4, 4)
        for i in range(1, 6):
            if self.upsample[i - 1]:
                h = F.interpolate(h, scale_factor=2)
            h = _gn_relu(getattr(self, f"bn{i}"), getattr(self, f"tp_conv{i}")(h))
        return h

    def high_res(self, a):
        h = _gn_relu(self.bn6, self.tp_conv6(F.interpolate(a, scale_factor=2)))
        return torch.tanh(self.tp_conv7(F.interpolate(h, scale_factor=2)))

    def slabs(self, z, crop, onehot=None):
        """(slab of X^H at `crop`, X^L) from one pass of G^A: what the training updates use."""
        a = self.common(z, onehot)
        start = crop // 4
        return self.high_res(a[:, :, start:start + self.size // 32]), self.sub_G(a)

    def forward(self, z, crop, onehot=None):
        """(full volume, slab at `crop`, X^L) from one pass of G^A."""
        a = self.common(z, onehot)
        start = crop // 4
        return self.high_res(a), self.high_res(a[:, :, start:start + self.size // 32]), self.sub_G(a)


class SubDiscriminator(nn.Module):  # D^L: conv(5-n)..conv4 stride 2, conv5 valid
    def __init__(self, size, num_class=0, width=1.0):
        super().__init__()
        self.num_class = num_class
        ch = channels(width)
        chain = _chain(_log2(size // 16), 256)
        cin = 1
        self.names = []
        for i, c in enumerate(chain, 5 - len(chain)):
            setattr(self, f"conv{i}", SNConv3d(cin, ch(c), 4, 2, 1))
            self.names.append(f"conv{i}")
            cin = ch(c)
        self.conv5 = SNConv3d(cin, 1 + num_class, 4, 1, 0)

    def forward(self, x):
        for name in self.names:
            x = F.leaky_relu(getattr(self, name)(x), 0.2)
        return self.conv5(x).flatten(1)


class Discriminator(nn.Module):  # D^H (conv(4-n)..7, fc1, fc2, fc2_class) + D^L (sub_D)
    def __init__(self, size, num_class=0, width=1.0):
        super().__init__()
        self.size, self.num_class = size, num_class
        ch = channels(width)
        chain = _chain(_log2(size // 32), 64)  # the 4^3 stride-2 stem: none at S = 32
        cin = 1
        self.names = []
        for i, c in enumerate(chain, 4 - len(chain)):
            setattr(self, f"conv{i}", SNConv3d(cin, ch(c), 4, 2, 1))
            self.names.append(f"conv{i}")
            cin = ch(c)
        self.conv4 = SNConv3d(cin, ch(128), (2, 4, 4), 2, (0, 1, 1))
        self.conv5 = SNConv3d(ch(128), ch(256), (2, 4, 4), 2, (0, 1, 1))
        self.conv6 = SNConv3d(ch(256), ch(512), (1, 4, 4), (1, 2, 2), (0, 1, 1))
        self.conv7 = SNConv3d(ch(512), ch(128), (1, 4, 4), 1, 0)
        self.names += ["conv4", "conv5", "conv6", "conv7"]
        self.fc1 = SNLinear(ch(128) + 1, ch(64))
        self.fc2 = SNLinear(ch(64), 1)
        if num_class:
            self.fc2_class = SNLinear(ch(64), num_class)
        self.sub_D = SubDiscriminator(size, num_class, width)

    def forward(self, slab, low_res, crop):
        h = slab
        for name in self.names:
            h = F.leaky_relu(getattr(self, name)(h), 0.2)
        h = h.flatten(1)
        pos = torch.full((h.shape[0], 1), crop / (self.size * 7 / 8), dtype=h.dtype, device=h.device)
        h = F.leaky_relu(self.fc1(torch.cat([h, pos], 1)), 0.2)
        low = self.sub_D(low_res)
        logit = (self.fc2(h) + low[:, :1]) / 2
        if not self.num_class:
            return logit
        return logit, (self.fc2_class(h) + low[:, 1:]) / 2


class Encoder(nn.Module):  # E^H
    def __init__(self, width=1.0):
        super().__init__()
        ch = channels(width)
        self.conv1, self.bn1 = nn.Conv3d(1, ch(32), 4, 2, 1), nn.GroupNorm(8, ch(32))
        self.conv2, self.bn2 = nn.Conv3d(ch(32), ch(32), 3, 1, 1), nn.GroupNorm(8, ch(32))
        self.conv3, self.bn3 = nn.Conv3d(ch(32), ch(64), 4, 2, 1), nn.GroupNorm(8, ch(64))

    def forward(self, x):
        for i in (1, 2, 3):
            x = _gn_relu(getattr(self, f"bn{i}"), getattr(self, f"conv{i}")(x))
        return x


class SubEncoder(nn.Module):  # E^G: conv(5-n)..conv4 stride 2 (at 128 conv2 takes 64 to 64), conv5
    def __init__(self, size, latent_dim=1024, width=1.0):
        super().__init__()
        ch = channels(width)
        chain = _chain(_log2(size // 16), 256)
        cin = ch(64)
        self.first = 5 - len(chain)
        for i, c in enumerate(chain, self.first):
            setattr(self, f"conv{i}", nn.Conv3d(cin, ch(c), 4, 2, 1))
            setattr(self, f"bn{i}", nn.GroupNorm(8, ch(c)))
            cin = ch(c)
        self.conv5 = nn.Conv3d(cin, latent_dim, 4, 1, 0)

    def forward(self, a):
        for i in range(self.first, 5):
            a = _gn_relu(getattr(self, f"bn{i}"), getattr(self, f"conv{i}")(a))
        return self.conv5(a).flatten(1)


def encode(encoder, sub_encoder, volume):
    """Volume [B, 1, S, S, S] -> z: E^H on the 8 slabs along D, concatenated, then E^G."""
    return sub_encoder(torch.cat([encoder(s) for s in volume.chunk(8, dim=2)], dim=2))


def randomize_(module, seed):
    """Give every parameter and buffer distinct random values (GroupNorm scales around 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("sv0"):
                continue
            noise = torch.randn(t.shape, generator=gen)
            parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            if isinstance(parent, nn.GroupNorm):
                t.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif name.endswith("u0"):
                t.copy_(noise)
            elif name.endswith("weight"):
                fan_in = t[0].numel()
                t.copy_(noise / fan_in ** 0.5)
            else:
                t.copy_(0.1 * noise)
    return module


def save_published(module, path, prefix="module."):
    """Write `module` the way the authors' files are: {'model': state_dict with 'module.' keys, 'optimizer'}."""
    state = {prefix + k: v for k, v in module.state_dict().items()}
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}}, path)
