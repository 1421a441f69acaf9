import numpy as np
import pytest
from PIL import Image

from pipeline import images


def test_flip_boxes():
    boxes = np.array([[10, 5, 30, 15], [0, 0, 100, 50]], dtype=np.float32)
    np.testing.assert_array_equal(images.flip_boxes(boxes, 100), [[70, 5, 90, 15], [0, 0, 100, 50]])
    assert images.flip_boxes(np.zeros((0, 4), np.float32), 100).shape == (0, 4)


def test_flip_moves_the_object_with_its_box(tmp_path):
    pixels = np.zeros((40, 100, 3), dtype=np.uint8)
    pixels[10:20, 5:25] = 255  # the object: x 5..25, y 10..20
    Image.fromarray(pixels).save(tmp_path / "a.png")  # lossless, so pixels compare exactly
    image = images.read_image(str(tmp_path / "a.png"))
    batch = {"image_id": np.array([1]), "image": [image], "boxes": [np.array([[5, 10, 25, 20]], np.float32)],
             "labels": [np.array([3])]}
    flipped = images.random_flip(batch, probability=1.0)
    (x0, y0, x1, y1), = flipped["boxes"][0].astype(int)
    assert (x0, y0, x1, y1) == (75, 10, 95, 20)
    inside = flipped["image"][0][:, y0:y1, x0:x1]
    assert inside.min() == 255 and flipped["image"][0].sum() == inside.sum()
    unflipped = images.random_flip(batch, probability=0.0)
    np.testing.assert_array_equal(unflipped["image"][0], image)


def test_aspect_groups_as_torchvision():
    # factor 3: bins 2 ** linspace(-1, 1, 7) = 0.5, 0.63, 0.79, 1, 1.26, 1.59, 2
    widths, heights = np.array([640, 480, 500, 1000, 100, 300]), np.array([480, 640, 500, 400, 300, 1000])
    assert images.aspect_group(widths, heights, 3).tolist() == [5, 2, 4, 7, 0, 0]


def test_group_by_aspect_makes_runs_and_keeps_order_within_a_group():
    widths = np.array([640, 480, 640, 480, 640, 500])
    heights = np.array([480, 640, 480, 640, 480, 500])
    batch = {"image_id": np.arange(6), "width": widths, "height": heights}
    grouped = images.group_by_aspect(batch, factor=3)
    assert grouped["image_id"].tolist() == [1, 3, 5, 0, 2, 4]  # portrait, square, landscape
    assert grouped["width"].tolist() == [480, 480, 500, 640, 640, 640]


def test_decode_batch_reads_real_jpegs(tiny_coco):
    files = sorted((tiny_coco / "val2017").glob("*.jpg"))[:2]
    sizes = [Image.open(f).size for f in files]
    batch = {"image_id": np.array([1, 2]), "path": np.array([str(f) for f in files], dtype=object),
             "width": np.array([w for w, _ in sizes]), "height": np.array([h for _, h in sizes]),
             "boxes": [np.array([1, 2, 3, 4], np.float32), np.zeros(0, np.float32)],
             "labels": [np.array([5]), np.array([], np.int64)]}
    out = images.decode_batch(batch)
    for image, (width, height) in zip(out["image"], sizes):
        assert image.shape == (3, height, width) and image.dtype == np.uint8
    assert out["boxes"][0].tolist() == [[1, 2, 3, 4]] and out["boxes"][1].shape == (0, 4)
    assert out["image_id"].tolist() == [1, 2]


def test_decode_batch_without_a_collector_names_the_unusable_file(tmp_path):
    batch = {"image_id": np.array([1]), "path": np.array([str(tmp_path / "gone.jpg")], dtype=object),
             "width": np.array([8]), "height": np.array([8]), "boxes": [np.zeros(0, np.float32)],
             "labels": [np.array([], np.int64)]}
    with pytest.raises(images.UnusableImage, match=r"gone.jpg: file not found"):
        images.decode_batch(batch)


def test_decoding_needs_no_torch():
    """Ray Data tasks import this module; torch there would cost seconds before a run's first batch."""
    import subprocess
    import sys

    code = "import sys, pipeline.images, pipeline.data; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_grayscale_and_cmyk_become_rgb(tmp_path):
    Image.new("L", (8, 4), 200).save(tmp_path / "gray.jpg")
    Image.new("CMYK", (8, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    gray, cmyk = images.read_image(str(tmp_path / "gray.jpg")), images.read_image(str(tmp_path / "cmyk.jpg"))
    assert gray.shape == cmyk.shape == (3, 4, 8)
    assert abs(int(gray[0, 0, 0]) - 200) <= 2 and gray[0].tolist() == gray[1].tolist() == gray[2].tolist()
    assert cmyk[0].mean() > 200 and cmyk[1].mean() < 50  # CMYK (0, 255, 255, 0) is red
