import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import data
from pipeline.manifest import SCHEMA


def test_flip_boxes():
    boxes = np.array([[10, 5, 30, 15], [0, 0, 100, 50]], dtype=np.float32)
    np.testing.assert_array_equal(data.flip_boxes(boxes, 100), [[70, 5, 90, 15], [0, 0, 100, 50]])
    assert data.flip_boxes(np.zeros((0, 4), np.float32), 100).shape == (0, 4)


def test_flip_moves_the_object_with_its_box(tmp_path):
    pixels = np.zeros((40, 100, 3), dtype=np.uint8)
    pixels[10:20, 5:25] = 255  # the object: x 5..25, y 10..20
    Image.fromarray(pixels).save(tmp_path / "a.png")  # lossless, so pixels compare exactly
    image = data.read_image(str(tmp_path / "a.png"))
    batch = {"image_id": np.array([1]), "image": [image], "boxes": [np.array([[5, 10, 25, 20]], np.float32)],
             "labels": [np.array([3])]}
    flipped = data.random_flip(batch, probability=1.0)
    (x0, y0, x1, y1), = flipped["boxes"][0].astype(int)
    assert (x0, y0, x1, y1) == (75, 10, 95, 20)
    inside = flipped["image"][0][:, y0:y1, x0:x1]
    assert inside.min() == 255 and flipped["image"][0].sum() == inside.sum()
    unflipped = data.random_flip(batch, probability=0.0)
    np.testing.assert_array_equal(unflipped["image"][0], image)


def test_aspect_groups_as_torchvision():
    # factor 3: bins 2 ** linspace(-1, 1, 7) = 0.5, 0.63, 0.79, 1, 1.26, 1.59, 2
    widths, heights = np.array([640, 480, 500, 1000, 100, 300]), np.array([480, 640, 500, 400, 300, 1000])
    assert data.aspect_group(widths, heights, 3).tolist() == [5, 2, 4, 7, 0, 0]


def test_group_by_aspect_makes_runs_and_keeps_order_within_a_group():
    widths = np.array([640, 480, 640, 480, 640, 500])
    heights = np.array([480, 640, 480, 640, 480, 500])
    batch = {"image_id": np.arange(6), "width": widths, "height": heights}
    grouped = data.group_by_aspect(batch, factor=3)
    assert grouped["image_id"].tolist() == [1, 3, 5, 0, 2, 4]  # portrait, square, landscape
    assert grouped["width"].tolist() == [480, 480, 500, 640, 640, 640]


def test_decode_batch_reads_real_jpegs(tiny_coco):
    files = sorted((tiny_coco / "val2017").glob("*.jpg"))[:2]
    batch = {"image_id": np.array([1, 2]), "path": np.array([str(f) for f in files], dtype=object),
             "boxes": [np.array([1, 2, 3, 4], np.float32), np.zeros(0, np.float32)],
             "labels": [np.array([5]), np.array([], np.int64)]}
    out = data.decode_batch(batch)
    for image, f in zip(out["image"], files):
        width, height = Image.open(f).size
        assert image.shape == (3, height, width) and image.dtype == np.uint8
    assert out["boxes"][0].tolist() == [[1, 2, 3, 4]] and out["boxes"][1].shape == (0, 4)


def test_ray_data_stream_keeps_sizes_and_reshuffles(ray_head, tiny_coco):
    import ray

    ray.init(address=ray_head.address)
    files = sorted((tiny_coco / "train2017").glob("*.jpg"))
    sizes = {i: Image.open(f).size for i, f in enumerate(files)}
    manifest = pa.table({"image_id": list(range(len(files))), "path": [str(f) for f in files],
                         "width": [sizes[i][0] for i in sizes], "height": [sizes[i][1] for i in sizes],
                         "boxes": [[0, 0, 4, 4] * (i % 3) for i in sizes], "labels": [[1] * (i % 3) for i in sizes]},
                        schema=SCHEMA)
    stream = data.train_dataset(manifest, seed=0, decode_batch_size=2, aspect_group_factor=3)
    orders = []
    for _ in range(3):
        order = []
        for batch in stream.iter_batches(batch_size=3, batch_format="numpy"):
            for image_id, image, boxes, labels in zip(batch["image_id"], batch["image"], batch["boxes"], batch["labels"]):
                assert image.shape == (3, sizes[image_id][1], sizes[image_id][0])
                assert boxes.shape == (image_id % 3, 4) and labels.shape == (image_id % 3,)
                order.append(int(image_id))
        assert sorted(order) == list(range(len(files)))
        orders.append(order)
    assert len({tuple(o) for o in orders}) > 1, "the order should change between epochs"
