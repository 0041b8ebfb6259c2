"""The CNN baselines: [EC]'s RegNetY configs, ResNet-50/101 and small CIFAR-style ResNets, on torchvision.

Both adapt to small inputs as small-image practice does: at image_size <= 64 there
is no early downsampling (a 3x3 stride-1 stem; ResNet also drops its max-pool), so
a 32 px image still reaches the last stage at 2x2 (RegNet) or 4x4 (ResNet).
torchvision hard-codes a 3-channel stride-2 stem, hence the swapped stems below.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models.regnet import BlockParams, RegNet
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
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


def build_resnet(*, layers: tuple, widths: tuple | None = None, image_size: int, in_chans: int, num_classes: int,
                 dropout: float) -> nn.Module:
    """torchvision's bottleneck ResNet; small inputs get a 3x3 stride-1 stem and no max-pool.
    With `widths`: the CIFAR ResNet instead (SmallResNet)."""
    if widths is not None:
        return _head_dropout(SmallResNet(layers, widths, in_chans, num_classes), dropout)
    model = ResNet(Bottleneck, list(layers), num_classes=num_classes)
    if image_size <= SMALL_INPUT:
        model.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    return _head_dropout(model, dropout)


class SmallResNet(nn.Module):
    """He et al.'s CIFAR ResNet: a 3x3 stem, then stages of torchvision BasicBlocks at
    `widths`, stride 2 between stages, global pooling, `fc`. torchvision's ResNet class
    hard-codes four stages of 64-512 channels, too costly for a few-MF model; [ViT]'s
    CNN baseline is a ResNet, and at 32 px this one keeps the full resolution in its
    first stage, which is what lets it learn `shapes` from a few hundred images."""

    def __init__(self, layers: tuple, widths: tuple, in_chans: int, num_classes: int, stem_stride: int = 1):
        super().__init__()
        self.stem = Conv2dNormActivation(in_chans, widths[0], kernel_size=3, stride=stem_stride)
        blocks, c_in = [], widths[0]
        for i, (depth, width) in enumerate(zip(layers, widths)):
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                down = None
                if stride > 1 or c_in != width:
                    down = nn.Sequential(nn.Conv2d(c_in, width, 1, stride, bias=False), nn.BatchNorm2d(width))
                blocks.append(BasicBlock(c_in, width, stride, down))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():  # torchvision's ResNet init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def resnet_stages(layers: tuple, widths: tuple | None, in_chans: int, image_size: int,
                  stem_stride: int = 1) -> tuple[nn.Module, int, int]:
    """(stem and the first len(LAYERS) stages of a ResNet, their output channels, their stride):
    the CNN half of a hybrid ([ViT] Sec. 3.1). WIDTHS: the CIFAR ResNet's stages (SmallResNet,
    stem stride STEM_STRIDE); None: torchvision's bottleneck ResNet-50 stages ([ViT]'s R50
    with stage 4 removed; BatchNorm where [ViT] has GroupNorm and weight standardisation)."""
    if widths is not None:
        net = SmallResNet(layers, widths, in_chans, 1, stem_stride)
        return nn.Sequential(net.stem, net.blocks), widths[len(layers) - 1], stages_stride(layers, widths, stem_stride,
                                                                                         image_size)
    net = build_resnet(layers=tuple(layers) + (1,) * (4 - len(layers)), image_size=image_size, in_chans=in_chans,
                       num_classes=1, dropout=0.0)
    stages = [net.layer1, net.layer2, net.layer3, net.layer4][:len(layers)]
    return (nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *stages), 64 * 2 ** (len(layers) + 1),
            stages_stride(layers, widths, stem_stride, image_size))


def stages_stride(layers: tuple, widths: tuple | None, stem_stride: int, image_size: int) -> int:
    """The stride of `resnet_stages`: a hybrid's token grid is the image size over it."""
    stem = stem_stride if widths is not None else 1 if image_size <= SMALL_INPUT else 4  # R50: conv1 + max-pool
    return stem * 2 ** (len(layers) - 1)


def _head_dropout(model, dropout: float):
    """Dropout before the classifier, so one --dropout works for every model (no-op at 0)."""
    if dropout:
        model.fc = nn.Sequential(nn.Dropout(dropout), model.fc)
    return model
