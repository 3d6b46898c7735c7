"""BiSeNet face parser (ResNet-18 context path, 19 CelebAMask-HQ classes), docs/reference.md §11 and §2.9.

Module and attribute names follow the official ``79999_iter.pth`` checkpoint key for key, so the
checkpoint loads strictly. Only the main head runs at inference; the auxiliary heads exist so that
their weights have somewhere to go.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from musetalk_ops.models.layout import ModelLayout, check_models, load_strict, read_state_dict, ready

PARSE_SIZE = 512
NUM_CLASSES = 19
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _global_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3), keepdim=True)


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut is projected when the width or the stride changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class ResNet18(nn.Module):
    """ResNet-18 without its classifier; returns the 1/8, 1/16 and 1/32 feature maps."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinement(nn.Module):
    """Re-weights channels by a sigmoid of their global average."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, 3)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(_global_mean(feat))))


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128, 3)
        self.conv_head16 = ConvBNReLU(128, 128, 3)
        self.conv_avg = ConvBNReLU(512, 128, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        context = F.interpolate(self.conv_avg(_global_mean(feat32)), feat32.shape[2:], mode="nearest")
        up32 = F.interpolate(self.arm32(feat32) + context, feat16.shape[2:], mode="nearest")
        up32 = self.conv_head32(up32)
        up16 = F.interpolate(self.arm16(feat16) + up32, feat8.shape[2:], mode="nearest")
        return feat8, self.conv_head16(up16), up32


class FeatureFusion(nn.Module):
    def __init__(self, cin: int = 256, cout: int = 256):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, 1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(_global_mean(feat)))))
        return feat * atten + feat


class Head(nn.Module):
    def __init__(self, cin: int, cmid: int, classes: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cmid, 3)
        self.conv_out = nn.Conv2d(cmid, classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """Face parser; ``forward`` returns the main head's logits at the input resolution."""

    def __init__(self, classes: int = NUM_CLASSES):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = Head(256, 256, classes)
        self.conv_out16 = Head(128, 64, classes)  # auxiliary (training) heads: weights only
        self.conv_out32 = Head(128, 64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat8, context8, _ = self.cp(x)  # the 1/8 backbone features stand in for the spatial path
        logits = self.conv_out(self.ffm(feat8, context8))
        return F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True)


def load_bisenet(root: str | os.PathLike, device: torch.device | str, dtype: torch.dtype) -> BiSeNet:
    """The official checkpoint overwrites every weight, so the ResNet-18 ImageNet file is only checked for."""
    check_models(root, components=("bisenet",))
    path = ModelLayout(root).bisenet_weights
    state = read_state_dict(path)
    with torch.device("meta"):
        model = BiSeNet()
    load_strict(model, state, path)
    return ready(model, device, dtype)


def preprocess(images: list[np.ndarray]) -> torch.Tensor:
    """RGB uint8 crops → contiguous [B,3,512,512] float32, as the official ``ToTensor`` + ``Normalize``:
    PIL bilinear resize, /255, ImageNet normalisation."""
    size = (PARSE_SIZE, PARSE_SIZE)
    batch = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.BILINEAR)) for im in images])
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def parse_faces(model: BiSeNet, images: list[np.ndarray]) -> np.ndarray:
    """Per-pixel class labels (uint8 [B,512,512], 0..18) for RGB uint8 face crops of any size.

    One image per forward pass, as the official parser: CPU convolutions pick their algorithm by batch
    size, and other logits could flip an argmax that is close to a tie.
    """
    param = next(model.parameters())
    labels = []
    for image in images:
        x = preprocess([image]).to(device=param.device, dtype=param.dtype)
        labels.append(model(x).argmax(dim=1).to(torch.uint8).cpu().numpy())
    if not labels:
        return np.zeros((0, PARSE_SIZE, PARSE_SIZE), np.uint8)
    return np.concatenate(labels)
