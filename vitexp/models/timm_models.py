"""timm models as vitexp models (`pip install 'vitexp[timm]'`): `timm:NAME` at timm's
defaults, or a preset's [models.NAME] table with `timm = "<timm name>"` and keywords for
`timm.create_model`. timm builds them, never with pretrained weights (nothing downloads);
vitexp sets the classes, the input channels, the dropout and, where the definition gives
`img_size`, the trial's image size.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from vitexp.errors import UserError, unknown
from vitexp.models.spec import FAMILIES, ModelSpec

DEFAULT_RESOLUTION = 224  # a timm model without img_size or a pretrained config: ImageNet's
# `init` of a [models.NAME] table (vitexp's keyword, not timm's): "timm" keeps timm's init;
# "torchvision" re-initialises as vitexp's own ViTs are (torchvision's): xavier-uniform Linear
# weights, zero biases, a zero head. timm draws Linear weights at a fixed std of 0.02, made for
# widths of 192 and more; at a 7 MF ViT's width 64 that is 4.4x below xavier, and SGD does not
# train such a model: timm's ViT at ViT_P-7MF's geometry stayed at chance (loss 2.29) after 300
# SGD steps on shapes where the same model at xavier init reached loss 1.06 (README "Models of
# your own"). Comparing a timm model with ViT_P then compares architectures, not inits.
INITS = ("timm", "torchvision")


def _timm(name: str):
    try:
        import timm
    except ImportError:
        raise UserError(f"model {name} needs timm, an optional dependency: pip install 'vitexp[timm]'") from None
    return timm


def timm_spec(name: str, timm_name, family: str, kwargs: dict) -> ModelSpec:
    """The spec of timm model TIMM_NAME under vitexp's NAME; its resolution is its img_size
    keyword where given (the data are then resized to it), else timm's default input size."""
    timm = _timm(name)
    if not isinstance(timm_name, str) or not timm.is_model(timm_name):
        raise unknown("timm model", str(timm_name), timm.list_models())
    if family not in FAMILIES:
        raise unknown(f"family of {name}", str(family), FAMILIES)
    size = kwargs.get("img_size")
    if size is None:
        cfg = timm.get_pretrained_cfg(timm_name)
        size = cfg.input_size[-1] if cfg is not None and cfg.input_size else DEFAULT_RESOLUTION
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 1024:
        raise UserError(f"[models.{name}] img_size must be a whole number of px in [8, 1024], got {size!r}")
    return ModelSpec(name, family, size, kwargs, timm=timm_name)


def build_timm(spec: ModelSpec, *, image_size: int, in_chans: int, num_classes: int, dropout: float) -> nn.Module:
    """timm.create_model with the definition's keywords; a keyword timm rejects is one line."""
    timm = _timm(spec.name)
    kwargs = dict(spec.kwargs)
    init = kwargs.pop("init", "timm")
    if init not in INITS:
        raise unknown(f"init in [models.{spec.name}]", str(init), INITS)
    if "img_size" in kwargs:
        kwargs["img_size"] = image_size
    common = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=dropout)
    try:
        if "img_size" not in kwargs and image_size != spec.resolution:
            # `timm:NAME` on images of another size: timm's ViTs take any img_size (position
            # embeddings sized to it); a model that takes no img_size (a CNN) is built as it is
            with contextlib.suppress(TypeError):
                model = timm.create_model(spec.timm, img_size=image_size, **common, **kwargs)
                return _finish(model, spec, init, in_chans, image_size)
        model = timm.create_model(spec.timm, **common, **kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as e:
        raise UserError(f"timm cannot build {spec.timm} with {kwargs or 'its defaults'}: {e or type(e).__name__}; "
                        f"fix the keywords in [models.{spec.name}]") from None
    return _finish(model, spec, init, in_chans, image_size)


def _finish(model: nn.Module, spec: ModelSpec, init: str, in_chans: int, image_size: int) -> nn.Module:
    """A built timm model made ready: vitexp's init where asked, buffers sized by one forward."""
    if init == "torchvision":
        _torchvision_init(model)
    # some timm models size a buffer at their first forward (ConViT's rel_indices); one forward
    # here gives them their shape before the EMA copies them. In eval mode without gradients it
    # draws no random numbers and updates no statistics. A model that cannot take the input at
    # all is refused by registry.check_model with its own line.
    with torch.no_grad(), contextlib.suppress(Exception):
        model.eval()(torch.zeros(1, in_chans, image_size, image_size))
    return model.train()


def _torchvision_init(model: nn.Module) -> None:
    """torchvision's ViT init on a timm model (see INITS); a module with an init of its own
    that carries the model's idea (ConViT's GPSA: `local_init`, its locality prior) redoes it,
    as timm itself does after its generic init."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
    for m in model.modules():
        if hasattr(m, "local_init"):
            m.local_init()
