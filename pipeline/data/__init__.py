"""The data path: COCO annotations to a manifest (manifest), the Ray Data streams (stream) whose
tasks read and decode the images on any node (images), the synthetic COCO-format set
(synthetic) and the COCO 2017 download (coco)."""
