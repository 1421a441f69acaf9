"""torchvision Faster R-CNN ResNet-50-FPN (91 classes), its backbone loaded from a local file.

With backbone weights (a local path or file:// URL: the workers get the file the driver found or
fetched, see pipeline.worker.weights) the backbone keeps the reference's FrozenBatchNorm2d and 3
trainable layers; with "none" it starts from random weights with trainable BatchNorm and all 5
layers trainable, as torchvision does without pretrained weights. Nothing here downloads.
"""

import torch

from pipeline.data.manifest import NUM_CLASSES  # COCO's category ids index the classes directly
from pipeline.worker.weights import checked_weights_file

TRAINABLE_BACKBONE_LAYERS = 3


def load_backbone_state(source: str) -> dict:
    """The ResNet-50 state dict from a local path or file:// URL. The SHA-256 prefix in the file
    name, when it has one, is checked every time."""
    return torch.load(checked_weights_file(source), map_location="cpu", weights_only=True)


def build_model(backbone_weights: str, min_size: int, max_size: int, box_batch_size_per_image: int = 512):
    """The model (a torchvision FasterRCNN). torchvision is imported here, in the workers: the
    driver imports this module only to hand the workers their function, and torchvision costs
    it 2 s of start-up (torchvision.ops imports torch._dynamo)."""
    from torchvision.models import resnet50
    from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    sizes = {"min_size": min_size, "max_size": max_size, "box_batch_size_per_image": box_batch_size_per_image}
    if backbone_weights == "none":
        return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **sizes)
    backbone = resnet50(norm_layer=FrozenBatchNorm2d)
    backbone.load_state_dict(load_backbone_state(backbone_weights))
    backbone = _resnet_fpn_extractor(backbone, TRAINABLE_BACKBONE_LAYERS)
    return FasterRCNN(backbone, num_classes=NUM_CLASSES, **sizes)
