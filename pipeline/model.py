"""torchvision Faster R-CNN ResNet-50-FPN (91 classes) and its ImageNet backbone weights.

With backbone weights (torchvision's ImageNet file, or the same from a local path or file://
URL) the backbone keeps the reference's FrozenBatchNorm2d and 3 trainable layers; with "none"
it starts from random weights with trainable BatchNorm and all 5 layers trainable, as
torchvision does without pretrained weights.
"""

import hashlib
import re
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from pipeline.manifest import NUM_CLASSES  # COCO's category ids index the classes directly

TRAINABLE_BACKBONE_LAYERS = 3
# torch.hub's convention: "name-<first hex digits of the file's SHA-256>.ext".
HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")


class WeightsError(ValueError):
    pass


def check_hash(path: Path) -> None:
    """When the file name carries a SHA-256 prefix (resnet50-0676ba61.pth), the file must match it."""
    match = HASH_IN_NAME.search(path.name)
    if not match:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise WeightsError(f"{path}: SHA-256 {digest.hexdigest()[:12]}... does not match the "
                           f"prefix {match.group(1)} in its name (corrupt or wrong file)")


def local_weights_file(source: str) -> list[Path]:
    """The file a local path or file:// URL names ([] for "imagenet" and "none")."""
    if source in ("imagenet", "none"):
        return []
    return [Path(url2pathname(urlparse(source).path)) if source.startswith("file://") else Path(source)]


def checked_weights_file(source: str) -> Path:
    """The local weights file `source` names, which must exist and match its name's hash prefix."""
    (path,) = local_weights_file(source)
    if not path.is_file():
        raise WeightsError(f"backbone weights {source!r}: no such file {path}")
    check_hash(path)
    return path


def load_backbone_state(source: str) -> dict:
    """The ResNet-50 state dict from "imagenet" (torchvision's URL, downloaded once into the torch
    hub cache), a local path or a file:// URL. The SHA-256 prefix in the file name, when it has
    one, is checked every time, the cached file's too."""
    if source == "imagenet":
        url = ResNet50_Weights.IMAGENET1K_V1.url
        torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, progress=False)
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        check_hash(path)
    else:
        path = checked_weights_file(source)
    return torch.load(path, map_location="cpu", weights_only=True)


def build_model(backbone_weights: str, min_size: int, max_size: int, box_batch_size_per_image: int = 512) -> FasterRCNN:
    sizes = {"min_size": min_size, "max_size": max_size, "box_batch_size_per_image": box_batch_size_per_image}
    if backbone_weights == "none":
        return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, **sizes)
    backbone = resnet50(norm_layer=FrozenBatchNorm2d)
    backbone.load_state_dict(load_backbone_state(backbone_weights))
    backbone = _resnet_fpn_extractor(backbone, TRAINABLE_BACKBONE_LAYERS)
    return FasterRCNN(backbone, num_classes=NUM_CLASSES, **sizes)
