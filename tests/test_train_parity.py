"""Step parity: our training iteration against the authors' train.py iteration, in PyTorch.

`Reference` re-states the loop body of batmanlab/HA-GAN's train.py (docs/architecture.md, "One
training iteration") on the networks of tests/torch_reference.py, generic in size and width: the
four updates in order (D, G, E^H, E^G), the authors' requires_grad toggling, Adam with betas
(0, 0.999), BCEWithLogits and L1 means, nearest X^L, the slab of A at r // 4, E^H frozen under
no_grad on the 8 slabs for E^G, and spectral norm's power iteration in every training-mode D
forward (D update: real, then fake; G update: fake). Both frameworks start from the same random
weights (imported with `torch_import.load_state_dicts`, u vectors included) and take the same
batches and draws (r, z_d, z_g) for K iterations. Each iteration starts from the same state (the
reference is given ours after the comparison) and must end in the same one.

Both sides run in float64 (the reference `.double()`, ours with Keras's float64 dtype policy:
hagan_tf.dtypes keeps every upcast "at least float32", so a float64 model stays float64). Then
every loss, weight, spectral-norm u and Adam second moment, and each iteration's step and
gradient, must agree to relative 1e-4 (TOLS). Seen: 1e-14 with r = 0 and r = 7S/8, 1e-8 with
the r in between, whose position input of D^H, r / (7S/8), ours computes in float32.
In float32 they could not: a float32 gradient is not a smooth function of float32 rounding. A
ReLU whose input lies within ~1e-6 of zero opens in one framework and stays shut in the other,
that one gate moves a whole network's gradient by 1-4%, and Adam, which steps each weight by
about lr whatever its gradient, turns noise-sized gradients into lr-sized steps of either sign
(about one iteration in three, on any seed: weights 4e-3 apart, Adam slots 9e-2). In float64
such a gate needs an input within ~1e-15 of zero. So a wrong learning rate, beta, epsilon, loss
term, loss scale or update order fails here at once, by orders of magnitude.

r is a multiple of 4: the one intended difference (ours aligns the real slab with the fake one,
the reference cuts the real slab at r and the fake at 4 * (r // 4)); both cut at r then.
"""

import contextlib
import math

import keras
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed (pip install '.[torch]')")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import torch_reference as R  # noqa: E402

from hagan_tf import HAGAN, HAGANConfig  # noqa: E402
from hagan_tf import torch_import as T  # noqa: E402

TOL = 1e-4
TOLS = {  # kind (see `errors`) -> tolerance; largest seen over the three cases in brackets
    "loss": TOL,  # [9e-10]
    "u": TOL,  # [2e-11]
    "weight": TOL,  # [1e-9]
    "adam_v": TOL,  # [1.1e-8]
    "grad": TOL,  # [6e-9]
    "step": TOL,  # [1.2e-8] an iteration's change of a weight tensor, against the reference's
    "step_norm": TOL,  # [1.2e-8]
}
K = 3  # iterations per case
BATCH = 2
NETWORKS = ("generator", "discriminator", "encoder", "sub_encoder")


class Reference:
    """The authors' training iteration (train.py), on the reference networks."""

    def __init__(self, cfg: HAGANConfig, seed: int = 0):
        s, lat, nc, w = cfg.size, cfg.latent_dim, cfg.num_classes, cfg.width
        self.size, self.num_class, self.lambda_class = s, nc, cfg.lambda_class
        self.nets = {"generator": R.Generator(s, lat, nc, w), "discriminator": R.Discriminator(s, nc, w),
                     "encoder": R.Encoder(w), "sub_encoder": R.SubEncoder(s, lat, w)}
        for i, net in enumerate(self.nets.values()):
            R.randomize_(net, seed + i).double().train()  # train.py: G.train(); D.train(); ...
        lrs = {"generator": cfg.lr_g, "discriminator": cfg.lr_d, "encoder": cfg.lr_eh,
               "sub_encoder": cfg.lr_eg}
        self.opts = {k: torch.optim.Adam(self.nets[k].parameters(), lr=lrs[k],
                                         betas=(cfg.beta_1, cfg.beta_2), eps=1e-8) for k in NETWORKS}
        self.G, self.D, self.E, self.Sub_E = (self.nets[k] for k in NETWORKS)
        self.loss_f, self.loss_l1 = nn.BCEWithLogitsLoss(), nn.L1Loss()
        for net in self.nets.values():  # train.py, before its loop
            _requires_grad(net, False)

    def state_dicts(self):
        """{network: state dict as NumPy} for torch_import.load_state_dicts (no 'module.')."""
        return {k: {n: t.detach().numpy().copy() for n, t in net.state_dict().items()}
                for k, net in self.nets.items()}

    keras_eps = True  # False: the authors' eps=1e-8 as is (see _step)

    def _step(self, name):
        # Keras's Adam (ours) adds epsilon (1e-7) to sqrt(v) and bias-corrects the step size;
        # torch's adds eps to sqrt(v / (1 - beta_2^t)). The two take the same step when torch's
        # eps is 1e-7 / sqrt(1 - beta_2^t), set here before every step. With the authors' 1e-8
        # as is, the steps of weights whose gradient is ~0 (a conv bias before GroupNorm over
        # single channels) differ by up to 50% of their size, and D's u vectors by 4e-4 after
        # one iteration: over the tolerances, from that alone.
        opt = self.opts[name]
        if not self.keras_eps:
            return opt.step()
        t = opt.state[next(iter(opt.param_groups[0]["params"]))].get("step", 0) + 1
        for group in opt.param_groups:
            group["eps"] = 1e-7 / math.sqrt(1 - group["betas"][1] ** float(t))
        opt.step()

    def iteration(self, real, labels, crop, z_d, z_g):
        """One iteration on real [B, 1, S, S, S] with the draws (r, z_d, z_g); returns the losses.

        As train.py: the real X^L and slab once, then the four updates in order.
        """
        b = self.batch(real, labels, crop)
        logs = self.d_update(b, z_d)
        logs.update(self.g_update(b, z_g))
        logs.update(self.eh_update(b))
        logs.update(self.eg_update(b))
        return {k: float(v.detach()) for k, v in logs.items()}

    def batch(self, real, labels, crop):
        s, nc = self.size, self.num_class
        return {"real": real, "labels": labels, "crop": crop,
                "onehot": None if nc == 0 else F.one_hot(labels, num_classes=nc).to(real.dtype),
                "small": F.interpolate(real, scale_factor=0.25),  # nearest
                "slab": real[:, :, crop:crop + s // 8],
                "ones": torch.ones((real.shape[0], 1), dtype=real.dtype),
                "zeros": torch.zeros((real.shape[0], 1), dtype=real.dtype)}

    def d_update(self, b, z):
        """D^H and D^L: BCE(D(real), 1) + BCE(D(G(z, r)), 0) [+ CE(class logits on real, labels)]."""
        G, D, crop, logs = self.G, self.D, b["crop"], {}
        _requires_grad(D, True)
        _requires_grad(self.Sub_E, False)
        D.zero_grad()
        if self.num_class == 0:
            y_real = D(b["slab"], b["small"], crop)
            d_real = self.loss_f(y_real, b["ones"])
            fake, fake_small = G.slabs(z, crop)
            y_fake = D(fake, fake_small, crop)
        else:
            y_real, y_real_class = D(b["slab"], b["small"], crop)
            logs["d_class"] = F.cross_entropy(y_real_class, b["labels"])
            d_real = self.loss_f(y_real, b["ones"]) + logs["d_class"]
            fake, fake_small = G.slabs(z, crop, b["onehot"])
            y_fake, _ = D(fake, fake_small, crop)
        logs["d_real"] = self.loss_f(y_real, b["ones"])  # ours logs the class term apart
        logs["d_fake"] = self.loss_f(y_fake, b["zeros"])
        logs["d_loss"] = d_real + logs["d_fake"]
        logs["d_loss"].backward()
        self._step("discriminator")
        return logs

    def g_update(self, b, z):
        """G^A, G^H, G^L: BCE(D(G(z, r)), 1) [+ lambda_class CE(class logits on fake, labels)]."""
        G, D, crop, logs = self.G, self.D, b["crop"], {}
        _requires_grad(D, False)
        _requires_grad(G, True)
        G.zero_grad()
        fake, fake_small = G.slabs(z, crop, b["onehot"])
        if self.num_class == 0:
            logs["g_loss"] = self.loss_f(D(fake, fake_small, crop), b["ones"])
        else:
            y_fake_g, y_fake_g_class = D(fake, fake_small, crop)
            logs["g_class"] = F.cross_entropy(y_fake_g_class, b["labels"])
            logs["g_loss"] = self.loss_f(y_fake_g, b["ones"]) + self.lambda_class * logs["g_class"]
        logs["g_loss"].backward()
        self._step("generator")
        return logs

    def eh_update(self, b):
        """E^H: |G^H(E^H(real slab)) - real slab|."""
        _requires_grad(self.E, True)
        _requires_grad(self.G, False)
        self.E.zero_grad()
        loss = self.loss_l1(self.G.high_res(self.E(b["slab"])), b["slab"])
        loss.backward()
        self._step("encoder")
        return {"eh_loss": loss}

    def eg_update(self, b):
        """E^G: E^H frozen on all 8 slabs; (|G(z-hat, r) slab - real slab| + |X^L - real X^L|) / 2,
        decoded with the true label."""
        s, real = self.size, b["real"]
        _requires_grad(self.Sub_E, True)
        _requires_grad(self.E, False)
        self.Sub_E.zero_grad()
        with torch.no_grad():
            z_hat = torch.cat([self.E(real[:, :, i:i + s // 8]) for i in range(0, s, s // 8)],
                              dim=2).detach()
        rec, rec_small = self.G.slabs(self.Sub_E(z_hat), b["crop"], b["onehot"])
        loss = (self.loss_l1(rec, b["slab"]) + self.loss_l1(rec_small, b["small"])) / 2.0
        loss.backward()
        self._step("sub_encoder")
        return {"eg_loss": loss}


def _requires_grad(net, flag):
    for p in net.parameters():
        p.requires_grad = flag


# -- reading ours through the import table ----------------------------------------------------

def _parts(var):
    """Our Keras variables behind a table entry (a BlockDense kernel is several)."""
    return var.layer.kernels if isinstance(var, T._JoinedKernel) else [var]


def _value(var):
    return np.concatenate([np.asarray(v) for v in _parts(var)], axis=-1)


def _velocity(opt, var):
    return np.concatenate([np.asarray(opt._velocities[opt._get_variable_index(v)])
                           for v in _parts(var)], axis=-1)


def _ours_optimizers(gan):
    return dict(zip(NETWORKS, (gan.g_optimizer, gan.d_optimizer, gan.eh_optimizer, gan.eg_optimizer)))


def _ours_trainable(gan):
    return dict(zip(NETWORKS, gan._update_variables()))


def snapshot(gan):
    """Our weights, by table entry, to measure each iteration's step."""
    return {(net, key): _value(var) for net in NETWORKS for key, var, _, _ in T._entries(gan, net)
            if var is not None}


def errors(gan, ref, before=None):
    """[(kind, name, error)] comparing ours with the reference, tensor by tensor (our layout).

    u:         max |ours - ref| / max |ref| of the spectral-norm vectors
    weight:    the same, of the trainable weights
    step:      |ours - ref|_2 / |ref step|_2, where a step is the iteration's change of the weights
               (or a full Adam step, lr on every element, where that is larger)
    step_norm: | |ours step|_2 - |ref step|_2 | / the same: how far the optimizer moved them
    adam_v:    max |sqrt(v) ours - sqrt(v) ref| / largest sqrt(v) ref of the layer (torch module)
    grad:      |sqrt(v) ours - sqrt(v) ref|_2 / |sqrt(v) ref of the layer|_2
    sqrt(v) is the RMS gradient Adam divides by. Layer scales: a conv bias followed by GroupNorm
    over single channels (width < 1 leaves 8 channels to 8 groups) has an exactly zero gradient,
    whose rounding noise (~1e-20) must only be small next to its layer's gradients.
    """
    out = []

    def rel(diff, scale):
        e = float(diff) / max(float(scale), 1e-30)
        return math.inf if math.isnan(e) else e

    opts = _ours_optimizers(gan)
    for net in NETWORKS:
        module, topt = ref.nets[net], ref.opts[net]
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        params = dict(module.named_parameters())
        lr = topt.param_groups[0]["lr"]
        rms = {}  # torch key -> (ours sqrt(v), reference sqrt(v)), in our layout
        for key, var, _, convert in T._entries(gan, net):
            if var is None:  # sv0: logged by the reference, read by neither
                continue
            ours, theirs = _value(var).astype(np.float64), convert(tensors[key].detach().numpy())
            if ours.shape != theirs.shape:
                out.append(("weight", f"{net} {key} shape {ours.shape} vs {theirs.shape}", math.inf))
                continue
            out.append(("u" if key.endswith(".u0") else "weight", f"{net} {key}",
                        rel(np.max(np.abs(ours - theirs)), np.max(np.abs(theirs)))))
            if key not in params:
                continue
            if before is not None:
                w0 = before[(net, key)]
                step = np.linalg.norm(theirs - w0)
                scale = max(step, lr * math.sqrt(w0.size))
                out.append(("step", f"{net} {key} step", rel(np.linalg.norm(ours - theirs), scale)))
                out.append(("step_norm", f"{net} {key} step size",
                            rel(abs(np.linalg.norm(ours - w0) - step), scale)))
            v = topt.state[params[key]].get("exp_avg_sq", torch.zeros_like(params[key]))
            rms[key] = (np.sqrt(_velocity(opts[net], var).astype(np.float64)),
                        np.sqrt(convert(v.numpy()).astype(np.float64)))
        layer_max, layer_norm = {}, {}
        for key, (_, theirs) in rms.items():
            layer = key.rsplit(".", 1)[0]
            layer_max[layer] = max(layer_max.get(layer, 0.0), float(np.max(theirs)))
            layer_norm[layer] = math.hypot(layer_norm.get(layer, 0.0), float(np.linalg.norm(theirs)))
        for key, (ours, theirs) in rms.items():
            layer = key.rsplit(".", 1)[0]
            out.append(("adam_v", f"{net} {key} Adam v",
                        rel(np.max(np.abs(ours - theirs)), layer_max[layer])))
            out.append(("grad", f"{net} {key} RMS gradient",
                        rel(np.linalg.norm(ours - theirs), layer_norm[layer])))
    return out


def _to_torch(var, shape, convert):
    """Our value of a table entry in the reference's layout (every conversion is a permutation)."""
    n = int(np.prod(shape))
    where = convert(np.arange(n).reshape(shape)).ravel()  # our element i is torch's where[i]
    flat = np.empty(n, np.float64)
    flat[where] = _value(var).ravel() if not isinstance(var, np.ndarray) else var.ravel()
    return torch.from_numpy(flat.reshape(shape))


def sync(gan, ref):
    """Give the reference our state exactly: weights, u vectors and Adam second moments."""
    opts = _ours_optimizers(gan)
    for net in NETWORKS:
        module, topt = ref.nets[net], ref.opts[net]
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        params = dict(module.named_parameters())
        for key, var, shape, convert in T._entries(gan, net):
            if var is None:
                continue
            with torch.no_grad():
                tensors[key].copy_(_to_torch(var, shape, convert))
            state = topt.state[params[key]] if key in params else {}
            if "exp_avg_sq" in state:
                state["exp_avg_sq"].copy_(_to_torch(_velocity(opts[net], var), shape, convert))


@contextlib.contextmanager
def float64():
    """Keras layers, variables and optimizer slots made in here are float64 (floatx and the
    global dtype policy, which Keras fixes at its first use: both are set, then restored)."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def build(size, width, latent_dim, num_classes, seed=0):
    cfg = HAGANConfig(size=size, width=width, latent_dim=latent_dim, num_classes=num_classes,
                      batch_size=BATCH)
    gan = HAGAN(cfg)
    gan.compile()
    ref = Reference(cfg, seed)
    T.load_state_dicts(gan, ref.state_dicts())
    return gan, ref


def draws(cfg, k, seed):
    """K iterations' batches: volume, labels and the draws r (multiples of 4, both ends) and z."""
    rng = np.random.default_rng(seed)
    s = cfg.size
    crops = [0, cfg.max_crop, 4 * int(rng.integers(1, cfg.max_crop // 4))][:k]
    for crop in crops:
        yield {"volume": rng.uniform(-1, 1, (BATCH, s, s, s, 1)),
               "label": rng.integers(0, max(cfg.num_classes, 1), BATCH).astype("int32"),
               "crop": np.full(BATCH, crop, "int32"),
               "z_d": rng.standard_normal((BATCH, cfg.latent_dim)),
               "z_g": rng.standard_normal((BATCH, cfg.latent_dim))}


def run_parity(size, width, latent_dim, num_classes, k=K, seed=0):
    """Train ours and the reference K iterations on the same batches and draws, both in float64.

    Returns (problems: the comparisons over their tolerance, worst: per iteration the largest
    error of each kind).
    """
    with float64():
        return _run_parity(size, width, latent_dim, num_classes, k, seed)


def _run_parity(size, width, latent_dim, num_classes, k, seed):
    gan, ref = build(size, width, latent_dim, num_classes, seed)
    cfg = gan.config
    # before any step: the table covers every variable both ways, and the import is exact
    for net, variables in _ours_trainable(gan).items():
        covered = {id(p) for _, var, _, _ in T._entries(gan, net) if var is not None for p in _parts(var)}
        assert {id(v) for v in variables} <= covered, net
        assert len(list(ref.nets[net].parameters())) == sum(
            1 for key, *_ in T._entries(gan, net) if not key.endswith(("u0", "sv0"))), net
    assert max(e for _, _, e in errors(gan, ref)) == 0.0
    problems, worst = [], []
    for it, batch in enumerate(draws(cfg, k, seed + 100)):
        before = snapshot(gan)
        if not num_classes:
            batch.pop("label")
        ours = gan.train_on_batch(batch, return_dict=True)
        theirs = ref.iteration(torch.from_numpy(np.moveaxis(batch["volume"], -1, 1)),
                               torch.from_numpy(batch["label"]).long() if num_classes else None,
                               int(batch["crop"][0]), torch.from_numpy(batch["z_d"]),
                               torch.from_numpy(batch["z_g"]))
        errs = [("loss", f"loss {key}: ours {float(ours[key]):.7g}, reference {value:.7g}",
                 abs(float(ours[key]) - value) / max(abs(value), 1e-6)) for key, value in theirs.items()]
        errs += errors(gan, ref, before)
        worst.append({kind: max(e for k_, _, e in errs if k_ == kind) for kind in TOLS})
        problems += [f"iteration {it} (r={batch['crop'][0]}): {name} off by {e:.3g} (tolerance "
                     f"{TOLS[kind]:g})" for kind, name, e in sorted(errs, key=lambda x: -x[2])
                     if not e <= TOLS[kind]]
        sync(gan, ref)  # the next iteration starts from the same state again
    for net, opt in _ours_optimizers(gan).items():  # each update stepped once per iteration
        assert int(opt.iterations.numpy()) == k, net
    return problems, worst


@pytest.mark.parametrize("size, width, latent_dim, num_classes", [
    (32, 0.25, 16, 0),
    (32, 0.25, 24, 2),
    (64, 0.125, 16, 0),
])
def test_training_iteration_matches_the_reference(size, width, latent_dim, num_classes):
    problems, worst = run_parity(size, width, latent_dim, num_classes)
    summary = "\n".join(f"iteration {i}: " + ", ".join(f"{k} {v:.2g}" for k, v in w.items())
                         for i, w in enumerate(worst))
    assert not problems, (f"{len(problems)} over tolerance, first 20:\n" + "\n".join(problems[:20])
                          + f"\nlargest error of each kind:\n{summary}")
