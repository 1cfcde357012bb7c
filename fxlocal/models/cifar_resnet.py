"""The CIFAR ResNets of the local-learning papers, registered with timm's model registry.

He et al.'s CIFAR ResNet-(6n+2) as InfoPro / AugLocal / MLAAN train it: a 3×3 stem of 16
channels, three stages of ``n`` BasicBlocks with widths 16/32/64 (stride 2 at the start of stages
2 and 3, projection shortcut: conv1×1 + BN), global average pool and a linear classifier.
ResNet-32 has n=5 (stem + 15 blocks = 16 units), ResNet-110 n=18 (55 units).
``timm.create_model("resnet32_cifar")`` and ``fxlocal convert resnet32_cifar`` build them.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CifarResNet"]


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int = 5, num_classes: int = 10, in_chans: int = 3, widths=(16, 32, 64)):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for s, width in enumerate(widths):
            stage = []
            for b in range(blocks_per_stage):
                stage.append(BasicBlock(in_planes, width, 2 if (s > 0 and b == 0) else 1))
                in_planes = width
            setattr(self, f"layer{s + 1}", nn.Sequential(*stage))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_planes
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.global_pool(x).flatten(1))


def _cfg(**kwargs):
    return {"num_classes": 10, "input_size": (3, 32, 32), "mean": (0.4914, 0.4822, 0.4465),
            "std": (0.2470, 0.2435, 0.2616), "first_conv": "conv1", "classifier": "fc", **kwargs}


default_cfgs = generate_default_cfgs({"resnet32_cifar": _cfg(), "resnet110_cifar": _cfg()})


def _create(variant: str, blocks_per_stage: int, pretrained: bool, **kwargs) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained, blocks_per_stage=blocks_per_stage, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for 32×32 inputs: 3 stages × 5 BasicBlocks, widths 16/32/64."""
    return _create("resnet32_cifar", 5, pretrained, **kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for 32×32 inputs: 3 stages × 18 BasicBlocks, widths 16/32/64."""
    return _create("resnet110_cifar", 18, pretrained, **kwargs)
