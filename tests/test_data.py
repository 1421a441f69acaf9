import pyarrow as pa
from PIL import Image

from pipeline import data
from pipeline.manifest import FOLDER_KEY, SCHEMA


def test_ray_data_stream_keeps_sizes_and_reshuffles(ray_head, tiny_coco):
    import ray

    ray.init(address=ray_head.address)
    files = sorted((tiny_coco / "train2017").glob("*.jpg"))
    sizes = {i: Image.open(f).size for i, f in enumerate(files)}
    manifest = pa.table({"image_id": list(range(len(files))), "path": [str(f) for f in files],
                         "width": [sizes[i][0] for i in sizes], "height": [sizes[i][1] for i in sizes],
                         "boxes": [[0, 0, 4, 4] * (i % 3) for i in sizes], "labels": [[1] * (i % 3) for i in sizes]},
                        schema=SCHEMA.with_metadata({FOLDER_KEY: str(tiny_coco / "train2017")}))
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
