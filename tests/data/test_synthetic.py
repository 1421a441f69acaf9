import dataclasses
import json
import os

import pytest
from PIL import Image

from pipeline.data import synthetic

# Small, with crowd regions and empty images frequent enough that seed 1 has both.
SPEC = synthetic.SyntheticSpec(train_images=10, val_images=4, num_categories=4, image_size=48,
                               crowd_fraction=0.3, empty_fraction=0.3, seed=1)
SPLITS = ("train", "val")


def load(root, split) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def snapshot(root) -> dict:
    """Every file under root (the stamp aside) by relative path: its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "synthetic.json"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synthetic"), SPEC)


def test_coco_2017_layout(root):
    for path in ("train2017", "val2017"):
        assert (root / path).is_dir()
    for path in ("annotations/instances_train2017.json", "annotations/instances_val2017.json"):
        assert (root / path).is_file()
    assert len(load(root, "train")["images"]) == 10
    assert len(load(root, "val")["images"]) == 4


@pytest.mark.parametrize("split", SPLITS)
def test_images_are_jpegs_of_the_annotated_size(root, split):
    doc = load(root, split)
    assert sorted(p.name for p in (root / f"{split}2017").iterdir()) == sorted(i["file_name"] for i in doc["images"])
    for entry in doc["images"]:
        with Image.open(root / f"{split}2017" / entry["file_name"]) as image:
            assert image.format == "JPEG"
            assert image.size == (entry["width"], entry["height"])


def test_categories_are_cocos(root):
    for split in SPLITS:
        categories = load(root, split)["categories"]
        ids = [c["id"] for c in categories]
        assert len(categories) == 80
        assert ids == sorted(ids) and ids[0] == 1 and ids[-1] == 90
        assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(ids)
        names = {c["id"]: c["name"] for c in categories}
        assert names[1] == "person" and names[90] == "toothbrush" and names[18] == "dog"
        supercategories = {c["id"]: c["supercategory"] for c in categories}
        assert supercategories[1] == "person" and supercategories[18] == "animal" and supercategories[90] == "indoor"
        used = {a["category_id"] for a in load(root, split)["annotations"]}
        assert used <= set(ids)


def test_like_coco_crowds_empties_and_both_orientations(root):
    images = [i for split in SPLITS for i in load(root, split)["images"]]
    annotations = [a for split in SPLITS for a in load(root, split)["annotations"]]
    assert any(i["width"] > i["height"] for i in images)
    assert any(i["width"] < i["height"] for i in images)
    crowds = [a for a in annotations if a["iscrowd"] == 1]
    assert crowds and all(set(a["segmentation"]) == {"counts", "size"} for a in crowds)
    annotated = {a["image_id"] for a in annotations}
    assert any(i["id"] not in annotated for i in images)
    for split in SPLITS:
        ids = [a["id"] for a in load(root, split)["annotations"]]
        assert len(ids) == len(set(ids))
    for a in annotations:
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and a["area"] == pytest.approx(w * h)


def test_deterministic_by_seed(root, tmp_path):
    again = synthetic.generate(tmp_path / "again", SPEC)
    assert snapshot(again) == snapshot(root)
    other = synthetic.generate(tmp_path / "other", dataclasses.replace(SPEC, seed=2))
    assert snapshot(other).keys() == snapshot(root).keys()
    assert load(other, "train") != load(root, "train")
    assert all(snapshot(other)[name] != data for name, data in snapshot(root).items() if name.endswith(".jpg"))


def test_reuses_the_same_spec_and_rewrites_for_another(tmp_path):
    synthetic.generate(tmp_path, SPEC)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    for path in files:  # back-date, so that a rewrite shows whatever the clock's resolution
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    first = snapshot(tmp_path)
    assert synthetic.generate(tmp_path, SPEC) == tmp_path
    assert all(p.stat().st_mtime_ns == 1_000_000_000 for p in files)
    synthetic.generate(tmp_path, dataclasses.replace(SPEC, seed=2))
    assert all(p.stat().st_mtime_ns > 1_000_000_000 for p in files)
    assert snapshot(tmp_path) != first
    assert json.loads((tmp_path / "synthetic.json").read_text())["seed"] == 2


def test_category_look_is_unique():
    looks = [synthetic.category_look(c) for c in synthetic.COCO_CATEGORY_IDS]
    assert len(synthetic.COCO_CATEGORY_IDS) == 80
    assert len(set(looks)) == 80


def test_num_categories_is_checked(tmp_path):
    with pytest.raises(ValueError, match="num_categories must be 1..80"):
        synthetic.generate(tmp_path, dataclasses.replace(SPEC, num_categories=81))


def test_another_spec_replaces_the_old_files(tmp_path):
    synthetic.generate(tmp_path, SPEC)
    synthetic.generate(tmp_path, dataclasses.replace(SPEC, train_images=2))
    assert len(list((tmp_path / "train2017").glob("*.jpg"))) == 2


def test_refuses_to_overwrite_other_annotations(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not written by this generator"):
        synthetic.generate(tmp_path, SPEC)


def test_the_category_table_is_torchvisions():
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    assert synthetic.COCO_NAMES == FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
