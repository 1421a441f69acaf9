import os
import shutil
import types

import numpy as np
import pytest
from PIL import Image

from pipeline.data import images
from pipeline.data.manifest import build_manifest, image_folder, split_paths


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
    out = images.decode_batch(batch, str(tiny_coco / "val2017"))
    for image, (width, height) in zip(out["image"], sizes):
        assert image.shape == (3, height, width) and image.dtype == np.uint8
    assert out["boxes"][0].tolist() == [[1, 2, 3, 4]] and out["boxes"][1].shape == (0, 4)
    assert out["image_id"].tolist() == [1, 2]


def test_decode_batch_without_a_collector_names_the_unusable_file(tmp_path):
    batch = {"image_id": np.array([1]), "path": np.array([str(tmp_path / "gone.jpg")], dtype=object),
             "width": np.array([8]), "height": np.array([8]), "boxes": [np.zeros(0, np.float32)],
             "labels": [np.array([], np.int64)]}
    with pytest.raises(images.UnusableImage, match=r"gone.jpg: file not found"):
        images.decode_batch(batch, str(tmp_path))


def one_row(path: str, width: int = 48, height: int = 32) -> dict:
    return {"image_id": np.array([1]), "path": np.array([path], dtype=object), "width": np.array([width]),
            "height": np.array([height]), "boxes": [np.zeros(0, np.float32)], "labels": [np.array([], np.int64)]}


def jpeg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 32), "red").save(path)
    return path


def fifo(path):
    os.mkfifo(path)  # opening it for reading waits for a writer: for ever
    return path


def symlink(path, target):
    path.symlink_to(target)
    return path


def folder(path):
    path.mkdir()
    return path


# name -> (make the entry in the split folder d and return its file_name, the error expected or None: decoded)
ENTRIES = {
    "FIFO": (lambda d: fifo(d / "fifo.jpg").name, "not a regular file"),
    "symlink to a FIFO": (lambda d: symlink(d / "link.jpg", fifo(d.parent / "fifo")).name, "not a regular file"),
    "folder": (lambda d: folder(d / "sub.jpg").name, "not a regular file"),
    "../ to a real JPEG": (lambda d: f"../{jpeg(d.parent / 'outside.jpg').name}", "outside the split's folder val2017/"),
    "absolute path to a real JPEG elsewhere": (lambda d: str(jpeg(d.parent / "other" / "x.jpg")),
                                               "outside the split's folder val2017/"),
    "symlink to a real JPEG elsewhere": (lambda d: symlink(d / "link.jpg", jpeg(d.parent / "real.jpg")).name, None),
    "../ that stays inside": (lambda d: f"{folder(d / 'sub').name}/../{jpeg(d / 'x.jpg').name}", None),
}


@pytest.mark.timeout(10)  # a FIFO opened would block: the check must not open it
@pytest.mark.parametrize("case", sorted(ENTRIES))
def test_only_regular_files_inside_the_split_folder_are_read(tmp_path, case):
    make, expected = ENTRIES[case]
    split = folder(tmp_path / "val2017")
    path = str(split / make(split))  # as the manifest joins them: an absolute file_name stays itself
    if expected is None:
        assert images.decode_batch(one_row(path), str(split))["image"][0].shape == (3, 32, 48)
    else:
        with pytest.raises(images.UnusableImage, match=f"^{path}: {expected}$"):
            images.decode_batch(one_row(path), str(split))


def test_a_symlinked_split_folder_is_read(tiny_coco, tmp_path):
    """The manifest resolves the folder it is given, and so does the folder it keeps."""
    annotations, split = split_paths(tmp_path, "val")
    annotations.parent.mkdir()
    shutil.copy(split_paths(tiny_coco, "val")[0], annotations)
    split.symlink_to(tiny_coco / "val2017")
    manifest, _ = build_manifest(annotations, split, drop_empty=False)
    for row in manifest.to_pylist():
        image = images.read_image(row["path"], row["width"], row["height"], image_folder(manifest))
        assert image.shape == (3, row["height"], row["width"])


class Recorder:
    """Stands in for the collector's actor handle: records the calls made with .remote()."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, method):
        return types.SimpleNamespace(remote=lambda *args: self.calls.append((method, *args)))


def test_decode_batch_tells_the_collector_what_it_reads(tiny_coco):
    files = sorted((tiny_coco / "val2017").glob("*.jpg"))[:2]
    batch = {"image_id": np.array([1, 2]), "path": np.array([str(f) for f in files], dtype=object),
             "width": np.array([Image.open(f).width for f in files]),
             "height": np.array([Image.open(f).height for f in files]),
             "boxes": [np.zeros(0, np.float32)] * 2, "labels": [np.array([], np.int64)] * 2}
    collector = Recorder()
    images.decode_batch(batch, str(tiny_coco / "val2017"), "val", collector)
    paths = [str(f) for f in files]
    assert collector.calls == [("reading", "val", paths), ("read", "val", paths)]


def test_decoding_needs_no_torch():
    """Ray Data tasks import this module; torch there would cost seconds before a run's first batch."""
    import subprocess
    import sys

    code = "import sys, pipeline.data.images, pipeline.data.stream; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_grayscale_and_cmyk_become_rgb(tmp_path):
    Image.new("L", (8, 4), 200).save(tmp_path / "gray.jpg")
    Image.new("CMYK", (8, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    gray, cmyk = images.read_image(str(tmp_path / "gray.jpg")), images.read_image(str(tmp_path / "cmyk.jpg"))
    assert gray.shape == cmyk.shape == (3, 4, 8)
    assert abs(int(gray[0, 0, 0]) - 200) <= 2 and gray[0].tolist() == gray[1].tolist() == gray[2].tolist()
    assert cmyk[0].mean() > 200 and cmyk[1].mean() < 50  # CMYK (0, 255, 255, 0) is red
