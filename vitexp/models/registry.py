"""The model registry: every model a study can name, with its tuned (lr, wd).

Two sets: [EC]'s models exactly as in PAPERS.md section 2 (224 px class; the
RegNetYs at their own resolutions), and a small family for 28-32 px data named,
like the paper's, by forward cost (mega-MACs at 32 px): ViT_P, its ViT_C twin with
one block fewer, and CNNs (RegNetY, ResNet) of the same cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from vitexp.errors import UserError, unknown
from vitexp.models.cnn import build_regnety, build_resnet
from vitexp.models.vit import build_vit

FAMILIES = ("vit_p", "vit_c", "regnety", "resnet")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # vit_p | vit_c | regnety | resnet
    resolution: int  # native input size in px
    kwargs: dict = field(hash=False)  # architecture, passed to the family's builder
    tuned: dict = field(hash=False)  # optimizer -> (lr at batch 2048, wd)

    @property
    def is_vit(self) -> bool:
        return self.family in ("vit_p", "vit_c")


# [EC] Table 4 (tuned at 50 epochs), lr at batch 2048
_REGNETY = {"adamw": (3.8e-3, 0.1), "sgd": (2.54, 2.4e-5)}
_VIT_P_SMALL = {"adamw": (2.0e-3, 0.20), "sgd": (1.9, 1.3e-5)}  # ViT_P-1GF and 4GF
_VIT_18GF = {"adamw": (1.0e-3, 0.24), "sgd": (1.1, 1.2e-5)}
_VIT_C_1GF = {"adamw": (2.5e-3, 0.19), "sgd": (1.9, 1.3e-5)}
_VIT_C_4GF = {"adamw": (1.0e-3, 0.24), "sgd": (1.3, 2.2e-5)}
_VIT_C_18GF = {"adamw": (1.0e-3, 0.24), "sgd": (1.1, 2.7e-5)}
# The small family's (25-200 MF, 32 px): the best sample of the random search
# experiments/tune_shapes.toml (3 epochs of 5,000 shapes images; experiments/README.md)
_SMALL_VIT_P = {"adamw": (1.2e-2, 0.25), "sgd": (2.4, 2.5e-4)}
_SMALL_VIT_C = {"adamw": (3.5e-2, 0.04), "sgd": (0.66, 2.5e-4)}
_SMALL_CNN = {"adamw": (7.0e-2, 0.04), "sgd": (0.88, 4e-5)}
# the ResNets' own search (resnet_25mf) drew the same samples as RegNetY's (same ranges and
# sample seed) and its best were the same pairs
_SMALL_RESNET = {"adamw": (7.0e-2, 0.04), "sgd": (0.88, 4e-5)}
# The 7mf level's own search at the default studies' budget, experiments/tune_shapes.toml
# (16-32 samples per pair, 10 epochs of 3,000 shapes images; results/tune_shapes)
_VIT_P_7MF = {"adamw": (8.0e-3, 0.035), "sgd": (2.4, 8.9e-5)}
_VIT_C_7MF = {"adamw": (3.8e-2, 0.017), "sgd": (2.4, 8.9e-5)}
_RESNET_7MF = {"adamw": (0.39, 0.19), "sgd": (8.5, 5.5e-4)}

# [EC]'s 7-conv stem of the 18GF/36GF ViT_C: (channels, stride) of its 3x3 convs at patch 16
_STEM_18GF = ((64, 2), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2))

_SPECS: dict[str, ModelSpec] = {}


def _add(name, family, resolution, tuned, **kwargs):
    _SPECS[name] = ModelSpec(name, family, resolution, kwargs, tuned)


def _vit_twins(level: str, resolution: int, patch: int, width: int, depth: int, heads: int, mlp: int,
               tuned_p: dict, tuned_c: dict, stem: tuple | None = None):
    """ViT_P and its ViT_C twin, one block shallower: [EC]'s conv stem costs about one block."""
    common = dict(width=width, heads=heads, mlp=mlp, patch=patch)
    _add(f"vit_p_{level}", "vit_p", resolution, tuned_p, depth=depth, conv_stem=False, **common)
    _add(f"vit_c_{level}", "vit_c", resolution, tuned_c, depth=depth - 1, conv_stem=True, stem=stem, **common)


# [EC] models (PAPERS.md section 2)
_vit_twins("1gf", 224, 16, 192, 12, 3, 576, _VIT_P_SMALL, _VIT_C_1GF)
_vit_twins("4gf", 224, 16, 384, 12, 6, 1152, _VIT_P_SMALL, _VIT_C_4GF)
_vit_twins("18gf", 224, 16, 768, 12, 12, 3072, _VIT_18GF, _VIT_C_18GF, stem=_STEM_18GF)
_vit_twins("36gf", 224, 16, 1024, 14, 16, 4096, _VIT_18GF, _VIT_C_18GF, stem=_STEM_18GF)  # 36GF: not tuned, 18GF values
_add("regnety_1gf", "regnety", 232, _REGNETY, depths=(1, 4, 10, 3), widths=(40, 120, 328, 904), group_width=4)
_add("regnety_4gf", "regnety", 240, _REGNETY, depths=(2, 6, 16, 2), widths=(96, 192, 512, 1216), group_width=32)
_add("regnety_16gf", "regnety", 256, _REGNETY, depths=(2, 7, 18, 2), widths=(168, 336, 896, 2128), group_width=56)
_add("regnety_32gf", "regnety", 268, _REGNETY, depths=(2, 7, 20, 2), widths=(216, 432, 1152, 2808), group_width=72)
# ResNets were not tuned in [EC]; they take the RegNetY values.
_add("resnet50", "resnet", 224, _REGNETY, layers=(3, 4, 6, 3))
_add("resnet101", "resnet", 224, _REGNETY, layers=(3, 4, 23, 3))

# Small family at 32 px (28 px Fashion-MNIST gives a 7x7 token grid): ViT_P with 4x4 patches
# (64 tokens + class token), MLP ratio 3 like [EC]'s 1GF/4GF and heads of width 64 where the
# width allows; ViT_C by the same stem rule (2 stride-2 convs at patch 4). A patch-4 conv stem
# costs about half a block, so ViT_C runs ~7% cheaper than its twin; the CNNs sit between.
# All RegNetYs here: depths 1,3,6,2 (stride-1 stem at 32 px, stages at 16, 8, 4, 2 px).
# ResNets ([ViT]'s CNN baseline): the CIFAR ResNet, 2 basic blocks per stage at 32, 16, 8 px.
# 7mf is the CPU level of the default scale study: 8x8 patches (16 tokens) make a ViT a
# quarter of the 25mf one's cost, so ten CPU minutes buy the ViTs the steps they need to fit.
SMALL_LEVELS = ("7mf", "25mf", "50mf", "200mf")
_vit_twins("7mf", 32, 8, 64, 9, 1, 192, _VIT_P_7MF, _VIT_C_7MF)
_add("resnet_7mf", "resnet", 32, _RESNET_7MF, layers=(2, 2, 2), widths=(8, 16, 32))
_vit_twins("25mf", 32, 4, 64, 8, 1, 192, _SMALL_VIT_P, _SMALL_VIT_C)
_add("regnety_25mf", "regnety", 32, _SMALL_CNN, depths=(1, 3, 6, 2), widths=(40, 80, 208, 504), group_width=8)
_add("resnet_25mf", "resnet", 32, _SMALL_RESNET, layers=(2, 2, 2), widths=(16, 32, 64))
_vit_twins("50mf", 32, 4, 96, 8, 2, 288, _SMALL_VIT_P, _SMALL_VIT_C)  # 2 heads of 48: width 64 or 128 misses the cost
_add("regnety_50mf", "regnety", 32, _SMALL_CNN, depths=(1, 3, 6, 2), widths=(64, 128, 320, 768), group_width=8)
_add("resnet_50mf", "resnet", 32, _SMALL_RESNET, layers=(2, 2, 2), widths=(22, 44, 88))
_vit_twins("200mf", 32, 4, 192, 8, 3, 576, _SMALL_VIT_P, _SMALL_VIT_C)
_add("regnety_200mf", "regnety", 32, _SMALL_CNN, depths=(1, 3, 6, 2), widths=(128, 256, 640, 1536), group_width=16)
_add("resnet_200mf", "resnet", 32, _SMALL_RESNET, layers=(2, 2, 2), widths=(44, 88, 176))


def level_models(level: str) -> list[str]:
    """The registered models of one small-family level, e.g. '25mf'."""
    return [name for name in _SPECS if name.endswith(f"_{level}")]


def list_models() -> list[str]:
    return list(_SPECS)


def get_spec(name: str) -> ModelSpec:
    if name not in _SPECS:
        raise unknown("model", name, list_models())
    return _SPECS[name]


def tuned_hparams(name: str, optimizer: str) -> tuple[float, float]:
    """(lr at batch 2048, wd) tuned for this model and optimizer."""
    tuned = get_spec(name).tuned
    if optimizer not in tuned:
        raise unknown("optimizer", optimizer, tuned)
    return tuned[optimizer]


def build_model(name: str, image_size: int | None = None, in_chans: int = 3, num_classes: int = 1000,
                patch_size: int | None = None, dropout: float = 0.0) -> nn.Module:
    """A fresh model; image_size None means the model's native resolution."""
    spec = get_spec(name)
    common = dict(image_size=image_size or spec.resolution, in_chans=in_chans, num_classes=num_classes,
                  dropout=dropout)
    if not spec.is_vit and patch_size is not None:
        raise UserError(f"patch size applies to ViTs only; '{name}' is a CNN")
    try:
        if spec.is_vit:
            return build_vit(**spec.kwargs, **common, patch_size=patch_size)
        builder = build_regnety if spec.family == "regnety" else build_resnet
        return builder(**spec.kwargs, **common)
    except UserError as e:
        raise UserError(f"{name}: {e}") from None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def is_vit(model_or_name) -> bool:
    if isinstance(model_or_name, str):
        return get_spec(model_or_name).is_vit
    return isinstance(unwrap(model_or_name), VisionTransformer)


def features(model: nn.Module, x):
    """The penultimate features (B, D): the input of the classifier, i.e. a ViT's
    class token after the final norm, a CNN's globally pooled features."""
    inner = unwrap(model)
    head = inner.heads if isinstance(inner, VisionTransformer) else inner.fc
    seen = []
    hook = head.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        hook.remove()
    return seen[0]
