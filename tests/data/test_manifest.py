import json

import numpy as np
import pytest

from pipeline.data.manifest import AnnotationError, build_manifest


def write_annotations(tmp_path, images, annotations):
    path = tmp_path / "instances.json"
    categories = [{"id": i, "name": str(i)} for i in (1, 3, 18, 90)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


IMAGES = [
    {"id": 1, "file_name": "a.jpg", "width": 100, "height": 50},
    {"id": 2, "file_name": "b.jpg", "width": 40, "height": 80},
    {"id": 3, "file_name": "c.jpg", "width": 60, "height": 60},
]
ANNOTATIONS = [
    {"id": 10, "image_id": 1, "category_id": 18, "bbox": [10, 5, 20, 10], "iscrowd": 0},
    {"id": 11, "image_id": 1, "category_id": 90, "bbox": [90, 40, 30, 30], "iscrowd": 0},  # clamped
    {"id": 12, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 50], "iscrowd": 1},  # crowd
    {"id": 13, "image_id": 2, "category_id": 3, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # zero width
    {"id": 14, "image_id": 2, "category_id": 3, "bbox": [50, 10, 10, 10], "iscrowd": 0},  # outside
    {"id": 15, "image_id": 2, "category_id": 3, "bbox": [-10, -10, 5, 5]},  # outside, no iscrowd key
    {"id": 16, "image_id": 3, "category_id": 3, "bbox": [20, 20, -5, 10], "iscrowd": 0},  # negative width
]


def test_rules_as_torchvision_reference(tmp_path):
    table, stats = build_manifest(write_annotations(tmp_path, IMAGES, ANNOTATIONS), tmp_path / "img", drop_empty=True)
    assert table.column("image_id").to_pylist() == [1]
    row = table.to_pylist()[0]
    assert row["path"] == str((tmp_path / "img" / "a.jpg").resolve())
    assert (row["width"], row["height"]) == (100, 50)
    np.testing.assert_array_equal(np.array(row["boxes"]).reshape(-1, 4), [[10, 5, 30, 15], [90, 40, 100, 50]])
    assert row["labels"] == [18, 90]
    assert table.schema.field("boxes").type.value_type == "float"
    assert stats.images == 3 and stats.kept == 1
    assert stats.dropped_without_boxes == 2
    assert stats.crowd_boxes == 1
    assert stats.degenerate_boxes == 4


def test_evaluation_keeps_images_without_boxes(tmp_path):
    table, stats = build_manifest(write_annotations(tmp_path, IMAGES, ANNOTATIONS), tmp_path, drop_empty=False)
    assert table.column("image_id").to_pylist() == [1, 2, 3]
    assert table.column("boxes").to_pylist()[1:] == [[], []]
    assert table.column("labels").to_pylist()[1:] == [[], []]
    assert stats.dropped_without_boxes == 0


def test_unknown_image_id_is_named(tmp_path):
    path = write_annotations(tmp_path, IMAGES, [{"id": 7, "image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(AnnotationError, match=r"instances.json: annotation 7 refers to unknown image id 99"):
        build_manifest(path, tmp_path, drop_empty=True)


@pytest.mark.parametrize("category_id", [5, 91, 0])
def test_unknown_category_is_named(tmp_path, category_id):
    path = write_annotations(tmp_path, IMAGES, [{"id": 8, "image_id": 1, "category_id": category_id,
                                                 "bbox": [0, 0, 1, 1]}])
    with pytest.raises(AnnotationError, match=rf"instances.json: annotation 8 has category id {category_id}, not one"):
        build_manifest(path, tmp_path, drop_empty=True)


def test_not_coco_is_named(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text('{"images": []')
    with pytest.raises(AnnotationError, match="instances.json: not valid JSON"):
        build_manifest(path, tmp_path, drop_empty=True)
    path.write_text('{"licenses": []}')
    with pytest.raises(AnnotationError, match="not a COCO instances file"):
        build_manifest(path, tmp_path, drop_empty=True)
    with pytest.raises(AnnotationError, match="missing.json: annotation file not found"):
        build_manifest(tmp_path / "missing.json", tmp_path, drop_empty=True)


def test_each_images_boxes_keep_the_files_order(tmp_path):
    """Annotations of two images interleaved in the file: each image's boxes in the file's order."""
    annotations = [{"id": n, "image_id": 1 + 2 * (n % 2), "category_id": 3, "bbox": [n, 0, 1, 1]} for n in range(40)]
    table, _ = build_manifest(write_annotations(tmp_path, IMAGES, annotations), tmp_path, drop_empty=True)
    left_edges = {row["image_id"]: row["boxes"][::4] for row in table.to_pylist()}
    assert left_edges == {1: list(range(0, 40, 2)), 3: list(range(1, 40, 2))}


def test_an_integer_beyond_floats_is_no_finite_number(tmp_path):
    path = write_annotations(tmp_path, IMAGES, [{"id": 9, "image_id": 1, "category_id": 3, "bbox": [10**400, 0, 1, 1]}])
    with pytest.raises(AnnotationError, match=r"annotation 9 has bbox \[1000.*, not four finite numbers"):
        build_manifest(path, tmp_path, drop_empty=True)
