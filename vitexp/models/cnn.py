"""The CNN baselines: [EC]'s RegNetY configs and ResNet-50/101, on torchvision.

Both adapt to small inputs as small-image practice does: at image_size <= 64 there
is no early downsampling (a 3x3 stride-1 stem; ResNet also drops its max-pool), so
a 32 px image still reaches the last stage at 2x2 (RegNet) or 4x4 (ResNet).
torchvision hard-codes a 3-channel stride-2 stem, hence the swapped stems below.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models.regnet import BlockParams, RegNet
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops.misc import Conv2dNormActivation

SMALL_INPUT = 64  # at or below this size the stems do not downsample


def _regnet_stem(in_chans: int, stride: int, _width_in: int, width_out: int, norm_layer, activation_layer):
    """torchvision's SimpleStemIN (3x3 conv, BN, ReLU) with our input channels and stride."""
    return Conv2dNormActivation(in_chans, width_out, kernel_size=3, stride=stride, norm_layer=norm_layer,
                                activation_layer=activation_layer)


def build_regnety(*, depths: tuple, widths: tuple, group_width: int, stem_width: int = 32,
                  image_size: int, in_chans: int, num_classes: int, dropout: float) -> RegNet:
    """RegNetY from explicit stage lists: bottleneck 1, SE 0.25, stride 2 per stage.

    The lists go to BlockParams directly: from_init_params quantises widths
    differently from pycls and would not give [EC]'s models.
    """
    n = len(depths)
    params = BlockParams(list(depths), list(widths), [group_width] * n, [1.0] * n, [2] * n, se_ratio=0.25)
    stem = partial(_regnet_stem, in_chans, 1 if image_size <= SMALL_INPUT else 2)
    model = RegNet(params, num_classes=num_classes, stem_width=stem_width, stem_type=stem)
    return _head_dropout(model, dropout)


def build_resnet(*, layers: tuple, image_size: int, in_chans: int, num_classes: int, dropout: float) -> ResNet:
    """torchvision's bottleneck ResNet; small inputs get a 3x3 stride-1 stem and no max-pool."""
    model = ResNet(Bottleneck, list(layers), num_classes=num_classes)
    if image_size <= SMALL_INPUT:
        model.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    return _head_dropout(model, dropout)


def _head_dropout(model, dropout: float):
    """Dropout before the classifier, so one --dropout works for every model (no-op at 0)."""
    if dropout:
        model.fc = nn.Sequential(nn.Dropout(dropout), model.fc)
    return model
