"""Model cost in the papers' convention: params, GF and activations of one forward pass at batch 1.

GF = multiply-accumulates x 1e-9 of the convs, linears and attention matmuls (not
norms or activations): torch's FlopCounterMode counts 2 FLOPs per MAC. acts =
output elements of those same layers (and max-pools), as pycls counts them. The
forward runs on the meta device, so even a 36GF model costs no compute or memory,
and in training mode: in eval mode nn.MultiheadAttention takes a fused path whose
attention matmuls the counter does not see.

`flop_counter()` is the one FLOP counter of vitexp (model cost here, training FLOPs in
`vitexp bench`). torch's own counter knows a different set of fused attention kernels
in every release (2.14 counts neither `_scaled_dot_product_flash_attention_for_cpu`
nor its backward, 2.13 counts both, the CUDA kernels' backward counts a recompute of
the scores), so vitexp maps every attention kernel itself: forward = the two matmuls
QK^T and PV, backward = their four gradient matmuls (model FLOPs, no recompute), the
convention of MFU. A test checks the count against the analytic one of a ViT.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
from pathlib import Path

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from vitexp.errors import UserError
from vitexp.fileio import atomic_write
from vitexp.models.registry import ModelSpec, build_model, get_spec, list_models
from vitexp.runtime import unwrap

_aten = torch.ops.aten
# counted costs of registered models ($VITEXP_CACHE, else ~/.cache/vitexp)
CACHE = Path(os.environ.get("VITEXP_CACHE") or Path.home() / ".cache" / "vitexp") / "complexity.json"
_LAYERS = {_aten.convolution, _aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten.max_pool2d_with_indices}
_FUSED_ATTENTION = {_aten._scaled_dot_product_flash_attention, _aten._scaled_dot_product_efficient_attention,
                    _aten._scaled_dot_product_flash_attention_for_cpu, _aten._scaled_dot_product_cudnn_attention}


_ATTENTION_KERNELS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                      "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                      "_scaled_dot_product_fused_attention_overrideable")


def _shape(t) -> tuple:
    """torch.Size whether the counter passes tensors (newer torch) or shapes (older)."""
    return tuple(getattr(t, "shape", t))


def _attention_flops(query, key, value, *args, **kwargs) -> int:
    b, h, lq, d = _shape(query)
    lk, dv = _shape(key)[-2], _shape(value)[-1]
    return 2 * b * h * lq * lk * (d + dv)  # QK^T and PV, 2 FLOPs per MAC


def _attention_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return 2 * _attention_flops(query, key, value)  # dQ, dK from dS; dV, dP from dO


def _attention_mapping() -> dict:
    """Every fused attention kernel this torch has, forward and backward."""
    out = {}
    for name in _ATTENTION_KERNELS:
        for suffix, fn in (("", _attention_flops), ("_backward", _attention_backward_flops)):
            op = getattr(_aten, name + suffix, None)
            if op is not None:
                out[op] = fn
    return out


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode with vitexp's attention formulas (see the module docstring)."""
    return FlopCounterMode(display=False, custom_mapping=_attention_mapping())


class _ActsCounter(TorchDispatchMode):
    """Counts output elements of the layers pycls counts activations for."""

    def __init__(self):
        super().__init__()
        self.acts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet in _LAYERS:
            self.acts += (out[0] if isinstance(out, tuple) else out).numel()
        elif packet in _FUSED_ATTENTION:  # scores (B, H, L, S) and output, as the unfused path has them
            q, k = args[0], args[1]
            self.acts += q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] + out[0].numel()
        return out


def complexity(name_or_model, resolution: int | None = None, in_chans: int = 3, num_classes: int = 1000) -> dict:
    """params_m, gmacs (multiply-accumulates x 1e-9, the papers' "GF"), acts_m of one image at `resolution` (default: native, or the ViT's own size)
    of a model given by name, by spec (a trial's `cfg.model_spec()`) or as an object.

    A model object is counted on a meta-device copy, so its weights and BN
    statistics stay untouched; in_chans/num_classes then come from the model.
    """
    if isinstance(name_or_model, (str, ModelSpec)):
        spec = name_or_model if isinstance(name_or_model, ModelSpec) else get_spec(name_or_model)
        return dict(_named(spec, resolution or spec.resolution, in_chans, num_classes))
    inner = unwrap(name_or_model)
    resolution = resolution or getattr(inner, "image_size", None)
    if resolution is None:
        raise UserError("complexity of a CNN object needs a resolution")
    model = copy.deepcopy(inner).to("meta")
    in_chans = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    return _count(model, in_chans, resolution)


@functools.lru_cache(maxsize=None)
def _named(spec: ModelSpec, resolution: int, in_chans: int, num_classes: int) -> tuple:
    """A model's cost never changes: counted once per torch version and architecture (and
    timm version for a timm model), then read from a small cache file (`vitexp models`
    takes a second, not 16)."""
    key = [spec.name, resolution, in_chans, num_classes, torch.__version__, spec.family,
           sorted((k, str(v)) for k, v in spec.kwargs.items()), "params_m gmacs acts_m"]  # what a count holds
    if spec.timm is not None:
        import timm

        key += [spec.timm, timm.__version__]
    key = json.dumps(key)
    cache = _read_cache()
    if key not in cache:
        with torch.device("meta"):
            model = build_model(spec, resolution, in_chans=in_chans, num_classes=num_classes)
        cache[key] = _count(model, in_chans, resolution)
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(CACHE, json.dumps(cache, sort_keys=True))
    return tuple(cache[key].items())


def _read_cache() -> dict:
    try:
        d = json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _count(model: torch.nn.Module, in_chans: int, resolution: int) -> dict:
    model.train()
    x = torch.empty(1, in_chans, resolution, resolution, device="meta")
    with flop_counter() as flops, _ActsCounter() as acts:
        model(x)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gmacs": flops.get_total_flops() / 2 / 1e9,
            "acts_m": acts.acts / 1e6}


def _depth_width(spec: ModelSpec) -> dict:
    """depth and width as the builders take them (a timm model: its depth and embed_dim keywords, where given)."""
    k = spec.kwargs
    if spec.timm is not None:
        return {"depth": k.get("depth", "-"), "width": k.get("embed_dim", "-")}
    depth = k["depth"] if spec.is_vit else sum(k.get("depths") or k["layers"])
    width = k["width"] if spec.is_vit else k["widths"][-1] if "widths" in k else 2048  # ResNet: 512 x 4
    return {"depth": depth, "width": width}


def complexity_table(resolution: int | None = None, names=None, num_classes: int = 1000,
                     models: dict | None = None) -> pd.DataFrame:
    """One row per model (default: the built-in ones), each at its native resolution unless
    given; params count a NUM_CLASSES-way head; MODELS: a preset's own ([models] tables)."""
    rows = []
    for name in names or list_models():
        spec = get_spec(name, models)
        res = resolution or spec.resolution
        rows.append({"model": name, "family": spec.family, "resolution": res,
                     **complexity(spec, res, num_classes=num_classes), **_depth_width(spec)})
    return pd.DataFrame(rows)
