"""PyTorch state dicts as NumPy arrays, read without running code stored in the file.

Shared by `hagan-import-torch` (the authors' HA-GAN files) and `hagan-evaluate` (MedicalNet).
"""

from __future__ import annotations

import os

import numpy as np

TORCH_HINT = ("reading .pth files needs PyTorch: pip install '.[torch]' (CPU wheel torch==2.13.0), "
              "or convert the state dict to .npz")
WRAPPERS = ("model", "state_dict")  # the authors' {'model': ...}, MedicalNet's {'state_dict': ...}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The state dict in `path`: tensors as float32 arrays, anything else as an object array
    (which the loaders report as "not a tensor"), DataParallel's 'module.' prefixes removed.

    `.pth`/`.pt` go through torch.load(weights_only=True), PyTorch's restricted unpickler; a
    {'model': ...} or {'state_dict': ...} wrapper is taken off. `.npz` with the same keys is
    read with allow_pickle=False (no PyTorch needed).
    """
    if path.endswith(".npz"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file {path!r} does not exist")
        with np.load(path, allow_pickle=False) as f:
            state = {k: f[k] for k in f.files}
    else:
        try:
            import torch
        except ImportError as e:
            raise ImportError(TORCH_HINT) from e
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file {path!r} does not exist")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...
            raise ValueError(f"{path}: not a weights-only PyTorch state dict "
                             f"(torch.load with weights_only=True refused it: {e})") from e
        for wrapper in WRAPPERS:
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a state dict or {{'model' or 'state_dict': "
                             f"state_dict, ...}}, got {type(obj).__name__}")
        state = {k: (v.detach().cpu().float().numpy() if isinstance(v, torch.Tensor)
                     else np.asarray(v, dtype=object)) for k, v in obj.items()}
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
