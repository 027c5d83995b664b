"""Segmentation models, heads and the EfficientNet-Lite0 backbone."""
from .deeplab import (ARCHS, ASPP, ASPPv2, DeepLabV2, DeepLabV3PlusHead, DeepLabV3PlusR50,
                      EffNetLite0DeepLabV3Plus, SegModel, build_model)
from .efficientnet_lite import EfficientNetLite0, efficientnet_lite0
from .heads import ClassAttention, MLPHead

__all__ = [
    "ARCHS", "ASPP", "ASPPv2", "ClassAttention", "DeepLabV2", "DeepLabV3PlusHead",
    "DeepLabV3PlusR50", "EffNetLite0DeepLabV3Plus", "EfficientNetLite0", "MLPHead",
    "SegModel", "build_model", "efficientnet_lite0",
]
