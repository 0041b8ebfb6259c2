"""ViT_P and ViT_C ([EC] section 2) on torchvision's VisionTransformer.

torchvision already builds both stems (`conv_stem_configs` appends the final 1x1
conv to the width itself); what it cannot express is an input with other than 3
channels, so `build_vit` swaps the first conv for one that takes `in_chans`.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer

from vitexp.errors import UserError
from vitexp.runtime import unwrap


def conv_stem_configs(width: int, patch_size: int, stem: tuple | None = None) -> list[ConvStemConfig]:
    """The 3x3 conv+BN+ReLU layers of a ViT_C stem for `patch_size` (before the 1x1 to the width).

    Without an explicit `stem` ((channels, stride), ... for patch 16): log2(p) stride-2
    convs whose channels double up to the width, e.g. 24, 48, 96, 192 for width 192 at
    p=16 ([EC] 1GF/4GF). An explicit stem at a smaller patch keeps its shortest tail
    holding log2(p) stride-2 convs, so it still ends at its widest layers.
    """
    n = int(math.log2(patch_size)) if patch_size > 1 else 0
    if n == 0 or 2**n != patch_size:
        raise UserError(f"a conv stem needs a power-of-two patch size >= 2, got {patch_size}; use 2, 4, 8 or 16")
    if stem is None:
        if width % 2 ** (n - 1):
            raise UserError(f"width {width} cannot halve {n - 1} times for a patch-{patch_size} conv stem; "
                            f"use a smaller patch size")
        return [ConvStemConfig(width >> (n - 1 - i), 3, 2) for i in range(n)]
    available = sum(s == 2 for _, s in stem)
    if n > available:
        raise UserError(f"this model's conv stem supports patch sizes up to {2**available}, got {patch_size}")
    start, twos = len(stem), 0
    while twos < n:
        start -= 1
        twos += stem[start][1] == 2
    return [ConvStemConfig(c, 3, s) for c, s in stem[start:]]


class RegisterViT(VisionTransformer):
    """torchvision's ViT with register tokens (Darcet et al. 2024, "Vision Transformers
    Need Registers"): learnable tokens appended after the position embeddings are added
    (a register has no position), carried through every block and dropped at the output,
    so the class token alone feeds the head. torchvision has no registers; timm's ViT has,
    but building this one on torchvision's keeps everything else identical to ViT_P."""

    def __init__(self, *args, registers: int, **kwargs):
        super().__init__(*args, **kwargs)
        # random, not zero like the class token: identical registers would get identical
        # gradients and stay one token repeated
        self.registers = nn.Parameter(torch.empty(1, registers, self.hidden_dim).normal_(std=0.02))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._process_input(x)
        n = x.shape[0]
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + self.encoder.pos_embedding
        x = torch.cat([x, self.registers.expand(n, -1, -1)], dim=1)
        x = self.encoder.ln(self.encoder.layers(self.encoder.dropout(x)))
        return self.heads(x[:, 0])


class DistilledViT(VisionTransformer):
    """DeiT's student (Touvron et al. 2021): a distillation token beside the class token, with
    its own position embedding and its own head. Training returns both heads' logits (the
    distillation loss takes them apart); evaluation returns the log of the two heads' averaged
    softmax, so argmax and the error are the averaged prediction's."""

    def forward(self, x: torch.Tensor):
        x = self._process_input(x)
        n = x.shape[0]
        x = self.encoder(torch.cat([self.class_token.expand(n, -1, -1), self.dist_token.expand(n, -1, -1), x], dim=1))
        cls, dist = self.heads(x[:, 0]), self.head_dist(x[:, 1])
        if self.training:
            return cls, dist
        return torch.log((cls.softmax(-1) + dist.softmax(-1)) / 2)


def add_distillation_token(model: VisionTransformer) -> DistilledViT:
    """MODEL (a plain class-token ViT or hybrid, as built) made a DistilledViT in place: every
    builder's ViT gets the token the same way. The token and its position embedding start as
    DeiT's (truncated normal, std 0.02), the second head as torchvision's first (zero)."""
    if type(model) is not VisionTransformer:
        raise UserError(f"a distillation token needs a plain class-token ViT, not a {type(model).__name__}")
    model.__class__ = DistilledViT
    model.dist_token = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, model.hidden_dim), std=0.02))
    pe = model.encoder.pos_embedding.detach()
    extra = nn.init.trunc_normal_(torch.empty_like(pe[:, :1]), std=0.02)
    model.encoder.pos_embedding = nn.Parameter(torch.cat([pe[:, :1], extra, pe[:, 1:]], dim=1))
    model.seq_length += 1
    model.head_dist = nn.Linear(model.hidden_dim, model.num_classes)
    nn.init.zeros_(model.head_dist.weight)
    nn.init.zeros_(model.head_dist.bias)
    return model


def build_vit(*, width: int, depth: int, heads: int, mlp: int, patch: int, conv_stem: bool,
              stem: tuple | None = None, registers: int = 0, image_size: int, in_chans: int, num_classes: int,
              patch_size: int | None, dropout: float) -> VisionTransformer:
    """A class-token ViT (with REGISTERS register tokens: RegisterViT); `patch_size` overrides
    the model's own patch. `dropout` is torchvision's (on the embeddings, the attention output
    and in the MLP, as in [ViT]); attention-weight dropout stays off, as in [ViT]'s models."""
    p = patch_size or patch
    if image_size % p:
        raise UserError(f"image size {image_size} is not divisible by the patch size {p}; "
                        f"use an image size that is a multiple of {p} (or another patch size)")
    if isinstance(registers, bool) or not isinstance(registers, int) or not 0 <= registers <= 1024:
        raise UserError(f"registers must be a whole number in [0, 1024], got {registers!r}")
    cls, extra = (RegisterViT, {"registers": registers}) if registers else (VisionTransformer, {})
    model = cls(image_size, p, depth, heads, width, mlp, dropout=dropout, num_classes=num_classes,
                conv_stem_configs=conv_stem_configs(width, p, stem) if conv_stem else None, **extra)
    if in_chans != 3:
        _set_in_chans(model, in_chans)
    return model


def build_hybrid(*, layers: tuple, widths: tuple | None = None, stem_stride: int = 1, width: int, depth: int,
                 heads: int, mlp: int, image_size: int, in_chans: int, num_classes: int,
                 patch_size: int | None, dropout: float) -> VisionTransformer:
    """[ViT]'s hybrid (Sec. 3.1): the first stages of a ResNet (`resnet_stages`), their feature
    map projected to the width by a 1x1 conv (a patch of 1 feature pixel) and read as tokens
    by the same Transformer as the ViTs (class token, position embeddings). The whole CNN is
    the torchvision ViT's `conv_proj`, so everything else (heads, position embeddings and their
    interpolation) is the ViTs'."""
    from vitexp.models.cnn import resnet_stages

    if patch_size is not None:
        raise UserError("a hybrid's token grid is its ResNet's stride; it takes no --patch-size")
    backbone, channels, stride = resnet_stages(layers, widths, in_chans, image_size, stem_stride)
    if image_size % stride:
        raise UserError(f"image size {image_size} is not divisible by the hybrid's CNN stride {stride}; "
                        f"use a multiple of {stride}")
    model = VisionTransformer(image_size, stride, depth, heads, width, mlp, dropout=dropout, num_classes=num_classes)
    proj = nn.Conv2d(channels, width, 1)
    nn.init.trunc_normal_(proj.weight, std=math.sqrt(1 / channels))  # torchvision's patch-projection init
    nn.init.zeros_(proj.bias)
    model.conv_proj = nn.Sequential(OrderedDict(cnn=backbone, proj=proj))
    return model


def _set_in_chans(model: VisionTransformer, in_chans: int) -> None:
    """Replace the first conv (torchvision hard-codes 3 input channels), initialised as torchvision does."""
    if isinstance(model.conv_proj, nn.Conv2d):
        old = model.conv_proj
        new = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride)
        nn.init.trunc_normal_(new.weight, std=math.sqrt(1 / new.weight[0].numel()))
        nn.init.zeros_(new.bias)
        model.conv_proj = new
    else:  # conv stem: its 3x3 convs keep PyTorch's default init in torchvision too
        first = model.conv_proj.conv_bn_relu_0
        old = first[0]
        first[0] = nn.Conv2d(in_chans, old.out_channels, 3, old.stride, padding=1, bias=False)


def interpolate_pos_embed(pe: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """Position embeddings (1, PREFIX + h*w, D) of a square h x w token grid resized to GRID,
    the PREFIX tokens' (class token) untouched ([ViT] Sec. 3.2). Bilinear with half-pixel
    centres (align_corners=False): the geometry of resizing the images themselves, and a
    linear interpolation never overshoots the learned values, which bicubic (timm's, and
    torchvision's with corners aligned) can at the 4x4-8x8 grids of the small models;
    big_vision, the ViT authors' code, also interpolates linearly (scipy's zoom, order 1)."""
    head, grid_part = pe[:, :prefix], pe[:, prefix:]
    side = math.isqrt(grid_part.shape[1])
    if side * side != grid_part.shape[1]:
        raise UserError(f"position embeddings of {grid_part.shape[1]} tokens are not a square grid")
    if (side, side) == tuple(grid):
        return pe.clone()
    d = grid_part.shape[-1]
    image = grid_part.reshape(1, side, side, d).permute(0, 3, 1, 2)
    image = F.interpolate(image.float(), size=tuple(grid), mode="bilinear", align_corners=False).to(pe.dtype)
    return torch.cat([head, image.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)], dim=1)


def resize_pos_embed(model: nn.Module, image_size: int) -> None:
    """Resize a ViT's position embeddings in place for `image_size` (`interpolate_pos_embed`)
    so forward works there."""
    vit = unwrap(model)
    if not isinstance(vit, VisionTransformer):
        raise UserError(f"resize_pos_embed needs a ViT, got {type(vit).__name__}")
    if image_size % vit.patch_size:
        raise UserError(f"image size {image_size} is not divisible by the patch size {vit.patch_size}; "
                        f"use a multiple of {vit.patch_size}")
    old = vit.encoder.pos_embedding
    side = image_size // vit.patch_size
    vit.encoder.pos_embedding = nn.Parameter(interpolate_pos_embed(old.detach(), (side, side)),
                                             requires_grad=old.requires_grad)
    vit.image_size = image_size
    vit.seq_length = vit.encoder.pos_embedding.shape[1]
