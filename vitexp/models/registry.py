"""The model registry: every built-in model a study can name (their tuned (lr, wd): vitexp/tuned.py).

Two built-in sets: [EC]'s models exactly as in PAPERS.md section 2 (224 px class; the
RegNetYs at their own resolutions), and a small family for 28-32 px data named,
like the paper's, by forward cost (mega-MACs at 32 px): ViT_P, its ViT_C twin with
one block fewer, and CNNs (RegNetY, ResNet) of the same cost. Beyond them, models a
preset defines in a [models.NAME] table (`define`: vitexp's own builders or a timm
model) and `timm:NAME` for any timm model at its defaults (vitexp/models/timm_models.py).
"""

from __future__ import annotations

import functools
import json

from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from vitexp.errors import UserError, unknown
from vitexp.runtime import unwrap
from vitexp.models.cnn import build_regnety, build_resnet
from vitexp.models.spec import BUILDER_FAMILIES, FAMILIES, ModelSpec
from vitexp.models.vit import add_distillation_token, build_hybrid, build_vit

# the keywords of vitexp's builders a [models.NAME] table may give, (required, optional)
BUILDER_KEYS = {"vit": (("width", "depth", "heads", "mlp", "patch"), ("stem", "registers")),
                "hybrid": (("layers", "width", "depth", "heads", "mlp"), ("widths", "stem_stride")),
                "resnet": (("layers",), ("widths",)),
                "regnety": (("depths", "widths", "group_width"), ("stem_width",))}
TABLE_KEYS = ("family", "builder", "timm", "resolution")  # a [models.NAME] table's own keys; the rest: builder keywords
DEFAULT_RESOLUTION = 32  # a preset's vitexp-built model without `resolution`: the small family's


# [EC]'s 7-conv stem of the 18GF/36GF ViT_C: (channels, stride) of its 3x3 convs at patch 16
_STEM_18GF = ((64, 2), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2))

_SPECS: dict[str, ModelSpec] = {}


def _add(name, family, resolution, **kwargs):
    _SPECS[name] = ModelSpec(name, family, resolution, kwargs, builtin=True)


def _vit_twins(level: str, resolution: int, patch: int, width: int, depth: int, heads: int, mlp: int,
               stem: tuple | None = None):
    """ViT_P and its ViT_C twin, one block shallower: [EC]'s conv stem costs about one block."""
    common = dict(width=width, heads=heads, mlp=mlp, patch=patch)
    _add(f"vit_p_{level}", "vit_p", resolution, depth=depth, conv_stem=False, **common)
    _add(f"vit_c_{level}", "vit_c", resolution, depth=depth - 1, conv_stem=True, stem=stem, **common)


# [EC] models (PAPERS.md section 2)
_vit_twins("1gf", 224, 16, 192, 12, 3, 576)
_vit_twins("4gf", 224, 16, 384, 12, 6, 1152)
_vit_twins("18gf", 224, 16, 768, 12, 12, 3072, stem=_STEM_18GF)
_vit_twins("36gf", 224, 16, 1024, 14, 16, 4096, stem=_STEM_18GF)  # 36GF: not tuned, 18GF values
_add("regnety_1gf", "regnety", 232, depths=(1, 4, 10, 3), widths=(40, 120, 328, 904), group_width=4)
_add("regnety_4gf", "regnety", 240, depths=(2, 6, 16, 2), widths=(96, 192, 512, 1216), group_width=32)
_add("regnety_16gf", "regnety", 256, depths=(2, 7, 18, 2), widths=(168, 336, 896, 2128), group_width=56)
_add("regnety_32gf", "regnety", 268, depths=(2, 7, 20, 2), widths=(216, 432, 1152, 2808), group_width=72)
# ResNets were not tuned in [EC]; they take the RegNetY values.
_add("resnet50", "resnet", 224, layers=(3, 4, 6, 3))
_add("resnet101", "resnet", 224, layers=(3, 4, 23, 3))

# Small family at 32 px (28 px Fashion-MNIST gives a 7x7 token grid): ViT_P with 4x4 patches
# (64 tokens + class token), MLP ratio 3 like [EC]'s 1GF/4GF and heads of width 64 where the
# width allows; ViT_C by the same stem rule (2 stride-2 convs at patch 4). A patch-4 conv stem
# costs about half a block, so ViT_C runs ~7% cheaper than its twin; the CNNs sit between.
# All RegNetYs here: depths 1,3,6,2 (stride-1 stem at 32 px, stages at 16, 8, 4, 2 px).
# ResNets ([ViT]'s CNN baseline): the CIFAR ResNet, 2 basic blocks per stage at 32, 16, 8 px.
# 7mf is the CPU level of the default scale study: 8x8 patches (16 tokens) make a ViT a
# quarter of the 25mf one's cost, so ten CPU minutes buy the ViTs the steps they need to fit.
SMALL_LEVELS = ("7mf", "25mf", "50mf", "200mf")
_vit_twins("7mf", 32, 8, 64, 9, 1, 192)
_add("resnet_7mf", "resnet", 32, layers=(2, 2, 2), widths=(8, 16, 32))
# The 7mf twins with 2 heads of 32 and 4 of 16 (same width, depth, MLP, cost and parameters): the
# one head of 64 above takes the papers' head width literally at width 64; these test whether that
# layout is a fair ViT at this scale. Their lr/wd (vitexp/tuned.py): the 7mf values (their Fashion-MNIST search's
# best are in the presets' [tuned] tables).
for _h in (2, 4):
    _vit_twins(f"7mf_h{_h}", 32, 8, 64, 9, _h, 192)
_vit_twins("25mf", 32, 4, 64, 8, 1, 192)
_add("regnety_25mf", "regnety", 32, depths=(1, 3, 6, 2), widths=(40, 80, 208, 504), group_width=8)
_add("resnet_25mf", "resnet", 32, layers=(2, 2, 2), widths=(16, 32, 64))
_vit_twins("50mf", 32, 4, 96, 8, 2, 288)  # 2 heads of 48: width 64 or 128 misses the cost
_add("regnety_50mf", "regnety", 32, depths=(1, 3, 6, 2), widths=(64, 128, 320, 768), group_width=8)
_add("resnet_50mf", "resnet", 32, layers=(2, 2, 2), widths=(22, 44, 88))
_vit_twins("200mf", 32, 4, 192, 8, 3, 576)
_add("regnety_200mf", "regnety", 32, depths=(1, 3, 6, 2), widths=(128, 256, 640, 1536), group_width=16)
_add("resnet_200mf", "resnet", 32, layers=(2, 2, 2), widths=(44, 88, 176))
# [EC]'s stem geometry at CPU cost: the 7mf twins at 64 px with 16x16 patches (16 tokens, as at 32 px with
# 8x8), so the patchify stem has [EC]'s large kernel and stride and the conv stem [EC]'s four stride-2 3x3
# convs (8, 16, 32, 64 channels, BN+ReLU) and its 1x1; the body is the 7mf one. Registry lr/wd: the 7mf
# values (their Fashion-MNIST search's best are in optimizer_fashion-mnist_cpu_p16's [tuned] tables).
_vit_twins("7mf_p16", 64, 16, 64, 9, 1, 192)
# A larger model as [EC] scales one (1GF -> 4GF: twice the width and heads, the same 16x16 patches and
# depth, the same lr): the 7mf twins at twice the width (128, 2 heads, MLP 384) and the same 8x8 patches
# at 32 px, so four times the parameters and ~3.7x the cost at the same 16 tokens. (The 25mf level buys its
# cost with 4x4 patches at the 7mf width, which changes the stem's kernel and stride, not the model's size.)
# Their lr/wd (vitexp/tuned.py): the 7mf values, as [EC] keeps ViT_P's from 1GF to 4GF.
_vit_twins("25mf_p8", 32, 8, 128, 9, 2, 384)
# Hybrids ([ViT] Sec. 3.1): the CIFAR ResNet's first stages (stem stride 2 at 32 px), a 1x1 projection,
# then the level's ViT body, fewer blocks to match its cost; the CNN's stride gives the ViT_P twin's token
# grid (7mf: 4x4 from 3 stages, stride 8; 25-200mf: 8x8 from 2 stages, stride 4), as [ViT]'s R50 hybrid
# keeps ViT-B/16's 14x14. Until their own searches: the ViT_C values of their level.
_add("hybrid_7mf", "hybrid", 32, layers=(1, 1, 1), widths=(16, 32, 64), stem_stride=2,
     width=64, depth=5, heads=1, mlp=192)
_add("hybrid_25mf", "hybrid", 32, layers=(1, 2), widths=(16, 32), stem_stride=2,
     width=64, depth=7, heads=1, mlp=192)
_add("hybrid_50mf", "hybrid", 32, layers=(2, 2), widths=(24, 48), stem_stride=2,
     width=96, depth=6, heads=2, mlp=288)
_add("hybrid_200mf", "hybrid", 32, layers=(1, 2), widths=(48, 96), stem_stride=2,
     width=192, depth=7, heads=3, mlp=576)
# [ViT]'s R50+ViT-B/16: ResNet-50 stages 1-3 with stage 3 at 9 blocks (the 4th stage's moved there; BatchNorm
# where [ViT] has GroupNorm + weight standardisation), stride 16, then ViT-B (18GF ViT_P's values, not tuned)
_add("hybrid_r50_vit_b16", "hybrid", 224, layers=(3, 4, 9), width=768, depth=12, heads=12, mlp=3072)


def define(name: str, table) -> ModelSpec:
    """The spec of a preset's [models.NAME] table: `timm = "<timm name>"` plus timm.create_model
    keywords, or (`builder = "vitexp"`, the default) a `family` of BUILDER_FAMILIES plus that
    builder's keywords and an optional `resolution`. Nothing is registered: whoever names the
    model passes its table (a trial config carries it as `model_def`, a study its spec's
    [models]); the same table gives the same spec, checked once per process."""
    where = f"[models.{name}]"
    if name in _SPECS:
        raise UserError(f"{where} redefines the built-in model '{name}'; give the preset's model another name")
    if name.startswith("timm:") or not name or any(c in name for c in " ,/"):
        raise UserError(f"{where}: a model name is letters, digits, '_', '-' or '.', got '{name}'")
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table of keywords, e.g. {{timm = \"convit_tiny\", embed_dim = 16}}")
    return _define(name, _canonical(table))


@functools.lru_cache(maxsize=None)
def _define(name: str, canonical: str) -> ModelSpec:
    """`define` of a table given as canonical JSON (a pure function: cached)."""
    where, table = f"[models.{name}]", json.loads(canonical)
    builder = table.get("builder", "timm" if "timm" in table else "vitexp")
    if builder not in ("vitexp", "timm"):
        raise unknown(f"builder in {where}", str(builder), ("vitexp", "timm"))
    kwargs = {k: _tuples(v) for k, v in table.items() if k not in TABLE_KEYS}
    family = table.get("family", "other" if builder == "timm" else None)
    if builder == "timm":
        from vitexp.models.timm_models import timm_spec

        if family not in FAMILIES:
            raise unknown(f"family in {where}", str(family), FAMILIES)
        if "resolution" in table:
            raise UserError(f"{where}: a timm model's resolution is its img_size keyword; "
                            f"give img_size = {table['resolution']} instead of resolution")
        return timm_spec(name, table.get("timm"), family, kwargs)
    if family not in BUILDER_FAMILIES:
        raise UserError(f"{where} needs family = one of {', '.join(BUILDER_FAMILIES)} (it picks vitexp's "
                        f"builder), got {family!r}; or give timm = \"<timm model name>\"")
    required, optional = BUILDER_KEYS["vit" if family in ("vit_p", "vit_c") else family]
    bad = sorted(set(kwargs) - set(required) - set(optional))
    if bad:
        raise unknown(f"keyword of vitexp's {family} builder in {where}", bad[0], required + optional + TABLE_KEYS)
    missing = [k for k in required if k not in kwargs]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}: vitexp's {family} builder needs "
                        f"{', '.join(required)}")
    _check_values(where, kwargs)
    if family in ("vit_p", "vit_c"):
        kwargs["conv_stem"] = family == "vit_c"
    resolution = table.get("resolution", DEFAULT_RESOLUTION)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 8 <= resolution <= 1024:
        raise UserError(f"{where} resolution must be a whole number of px in [8, 1024], got {resolution!r}")
    return ModelSpec(name, family, resolution, kwargs)


POSITIVE_INTS = ("width", "depth", "heads", "mlp", "patch", "group_width", "stem_width", "stem_stride")
INT_LISTS = ("layers", "widths", "depths")


def _check_values(where: str, kwargs: dict) -> None:
    """A [models.NAME] table's builder keywords are numbers a model can have, checked before any
    builder sees them: one line per impossible value."""
    def whole(v, least=1) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    for k, v in kwargs.items():
        if k in POSITIVE_INTS and not whole(v):
            raise UserError(f"{where} {k} must be a positive whole number, got {v!r}")
        if k == "registers" and not whole(v, 0):
            raise UserError(f"{where} registers must be a whole number >= 0, got {v!r}")
        if k in INT_LISTS and not (isinstance(v, tuple) and v and all(whole(x) for x in v)):
            raise UserError(f"{where} {k} must be a list of positive whole numbers, e.g. [2, 2, 2], got {v!r}")
        if k == "stem" and v is not None and not (isinstance(v, tuple) and v and all(
                isinstance(x, tuple) and len(x) == 2 and all(whole(y) for y in x) for x in v)):
            raise UserError(f"{where} stem must be a list of [channels, stride] pairs, e.g. [[16, 2], [32, 2]], "
                            f"got {v!r}")
    if "heads" in kwargs and "width" in kwargs and kwargs["width"] % kwargs["heads"]:
        raise UserError(f"{where} width {kwargs['width']} does not split into {kwargs['heads']} heads; give a "
                        f"width that is a multiple of heads")
    if "widths" in kwargs and "layers" in kwargs and len(kwargs["widths"]) != len(kwargs["layers"]):
        raise UserError(f"{where} gives {len(kwargs['widths'])} widths for {len(kwargs['layers'])} stages (layers); "
                        f"give one width per stage")


def _tuples(v):
    """TOML arrays as the builders' tuples (a stem is a tuple of (channels, stride) pairs)."""
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def spec_of(name: str, definition: dict | None = None) -> ModelSpec:
    """The spec of a trial's model: its definition where a preset gave one, else the name's."""
    return define(name, definition) if definition else get_spec(name)


def _canonical(table: dict) -> str:
    return json.dumps(table, sort_keys=True, default=str)


def level_models(level: str) -> list[str]:
    """The registered models of one small-family level, e.g. '25mf'."""
    return [name for name in _SPECS if name.endswith(f"_{level}")]


def list_models() -> list[str]:
    """The built-in models (a preset's own are in its [models] tables)."""
    return list(_SPECS)


def get_spec(name: str, models: dict | None = None) -> ModelSpec:
    """The spec of NAME: one of MODELS (a preset's [models] tables, name -> table), a built-in
    model, or `timm:NAME`."""
    if models and name in models:
        return define(name, models[name])
    if name.startswith("timm:"):
        from vitexp.models.timm_models import timm_spec

        return timm_spec(name, name[len("timm:"):], "other", {})
    if name not in _SPECS:
        raise unknown("model", name, list_models() + list(models or {}))
    return _SPECS[name]


def check_student(spec: ModelSpec) -> None:
    """The one rule of distillation's students: a model with DeiT's distillation token."""
    if not spec.is_vit:
        raise UserError(f"{spec.name} cannot be a distilled student: only vitexp's ViTs and hybrids have a "
                        f"distillation token; give a ViT as the student and the CNN as its teacher")


def build_model(name: str | ModelSpec, image_size: int | None = None, in_chans: int = 3, num_classes: int = 1000,
                patch_size: int | None = None, dropout: float = 0.0, distilled: bool = False) -> nn.Module:
    """A fresh model (from its name or its spec); image_size None means the model's native
    resolution; DISTILLED: a ViT or hybrid with DeiT's distillation token (`DistilledViT`)."""
    spec = name if isinstance(name, ModelSpec) else get_spec(name)
    if distilled:
        check_student(spec)
        return add_distillation_token(build_model(spec, image_size, in_chans, num_classes, patch_size, dropout))
    common = dict(image_size=image_size or spec.resolution, in_chans=in_chans, num_classes=num_classes,
                  dropout=dropout)
    if not spec.is_vit and patch_size is not None:
        raise UserError(f"patch size applies to vitexp's ViTs only; '{spec.name}' is not one")
    try:
        if spec.timm is not None:
            from vitexp.models.timm_models import build_timm

            return build_timm(spec, **common)
        if spec.family == "hybrid":
            return build_hybrid(**spec.kwargs, **common, patch_size=patch_size)
        if spec.is_vit:
            return build_vit(**spec.kwargs, **common, patch_size=patch_size)
        builder = build_regnety if spec.family == "regnety" else build_resnet
        return builder(**spec.kwargs, **common)
    except UserError as e:
        raise UserError(f"{spec.name}: {e}") from None
    except TypeError as e:  # a preset's keyword the builder does not take
        raise UserError(f"{spec.name}: {e}; fix the keywords in [models.{spec.name}]") from None


def check_model(spec: ModelSpec, image_size: int, in_chans: int, num_classes: int) -> None:
    """A defined model built on the meta device and run once on a batch of the data's
    shape: a definition that cannot build, cannot take these images, or does not output
    (batch, classes) is refused here, before any folder is written (no compute, no memory)."""
    _probe(spec, image_size, in_chans, num_classes)


@functools.lru_cache(maxsize=256)
def _probe(spec: ModelSpec, image_size: int, in_chans: int, num_classes: int) -> None:
    import torch

    with torch.device("meta"):
        model = build_model(spec, image_size, in_chans=in_chans, num_classes=num_classes)
    what = f"{in_chans}-channel {image_size} px images"
    try:
        out = model.train()(torch.empty(2, in_chans, image_size, image_size, device="meta"))
    except Exception as e:  # noqa: BLE001 -- whatever the forward raises, the definition cannot take the data
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model {spec.name} cannot take {what} ({first}); set its image size (img_size, "
                        f"resolution or --image-size) or patch size to fit the data") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"model {spec.name} outputs {got} for a batch of 2 {what}, not (2, {num_classes}) "
                        f"logits; give a classifier (num_classes is set by vitexp)")


def is_vit(model_or_name) -> bool:
    if isinstance(model_or_name, str):
        return get_spec(model_or_name).is_vit
    return isinstance(unwrap(model_or_name), VisionTransformer)


def classifier(model: nn.Module) -> nn.Module:
    """The head: a ViT's `heads`, a timm model's `get_classifier()`, a CNN's `fc`."""
    inner = unwrap(model)
    return (inner.heads if isinstance(inner, VisionTransformer) else
            inner.get_classifier() if hasattr(inner, "get_classifier") else inner.fc)


def features(model: nn.Module, x):
    """The penultimate features (B, D): the input of the classifier, i.e. a ViT's
    class token after the final norm, a CNN's globally pooled features (a timm model's
    `get_classifier()` input, its pre-logits)."""
    head = classifier(model)
    seen = []
    hook = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    return seen[0]
