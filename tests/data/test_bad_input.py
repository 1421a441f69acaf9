"""Every kind of bad input gets its documented answer (README "When things go wrong"): unusable
images are left out, counted and named; structural and configuration errors stop the run before
Ray starts, in one line naming the problem."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import image_file, make_damaged_coco, truncated, venv_env
from pipeline import cli
from pipeline.data import images, synthetic
from pipeline.data.manifest import AnnotationError, build_manifest, split_paths

ROOT = Path(__file__).resolve().parents[2]


def exif_rotated(folder: Path) -> Path:
    """Stored 48x32, EXIF orientation 6 (displayed turned by 90 degrees: 32x48)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return image_file(folder, "exif.jpg", exif=exif.tobytes())


# name -> (make the file, (width, height) the annotations say, expected: a (C, H, W) shape or the error)
CASES = {
    "missing file": (lambda d: d / "missing.jpg", (48, 32), "file not found"),
    "truncated JPEG": (lambda d: truncated(image_file(d, "cut.jpg")), (48, 32), "cannot decode"),
    "not an image": (lambda d: text_file(d / "notes.jpg"), (48, 32), "cannot decode"),
    "PNG named .jpg": (lambda d: image_file(d, "png.jpg", format="PNG"), (48, 32), (3, 32, 48)),
    "grayscale JPEG": (lambda d: image_file(d, "gray.jpg", mode="L"), (48, 32), (3, 32, 48)),
    "CMYK JPEG": (lambda d: image_file(d, "cmyk.jpg", mode="CMYK"), (48, 32), (3, 32, 48)),
    "EXIF-rotated, annotated as stored": (exif_rotated, (48, 32), (3, 32, 48)),
    "EXIF-rotated, annotated upright": (exif_rotated, (32, 48), (3, 48, 32)),
    "size differs from the annotations": (lambda d: image_file(d, "small.jpg"), (64, 64),
                                          "decoded 48x32, the annotations say 64x64"),
}


def text_file(path: Path) -> Path:
    path.write_text("not an image")
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_image_case(tmp_path, case):
    make, (width, height), expected = CASES[case]
    path = make(tmp_path)
    if isinstance(expected, tuple):
        array = images.read_image(str(path), width, height)
        assert array.shape == expected and array.dtype == np.uint8
    else:
        with pytest.raises(images.UnusableImage, match=expected):
            images.read_image(str(path), width, height)


@pytest.fixture
def damaged_coco(tmp_path) -> Path:
    return make_damaged_coco(tmp_path / "coco")


def test_unusable_images_are_left_out_counted_and_named(two_node_run):
    """On the run that tests/test_multinode.py checks too: the damaged set, decoded on two nodes."""
    result = two_node_run["result"]
    bad = result["bad_images"]
    reasons = sorted(line.split(": ", 1)[1] for line in bad["train"])
    assert [reason.split(" ")[0] for reason in reasons] == ["cannot", "decoded", "file"], reasons
    decoded, annotated = re.fullmatch(r"decoded (\d+)x\d+, the annotations say (\d+)x\d+", reasons[1]).groups()
    assert int(decoded) == int(annotated) + 8
    assert sorted(line.split(": ", 1)[1].split(":")[0] for line in bad["val"]) == [
        "cannot decode", "not a regular file", "outside the split's folder val2017/"], bad["val"]
    # 7 usable training images, split equally (3 each), 2 epochs; the grayscale and PNG ones train.
    assert result["images_trained"] == 2 * 2 * ((10 - 3) // 2)
    assert result["epochs"] == 2


def test_too_many_unusable_images_stop_the_run(ray_head, damaged_coco, tmp_path):
    """Run with --verbose, which shows what Ray says (its workers' lines), the answer among it."""
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "--preset", "smoke", "--synthetic-train-images", "0",
                           "--data-root", str(damaged_coco), "--output-dir", str(tmp_path), "--max-bad-images", "1",
                           "--verbose"],
                          cwd=ROOT, env=venv_env(RAY_ADDRESS=ray_head.address), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 1
    assert re.search(r"\(RayTrainWorker pid=\d+\)", done.stdout + done.stderr)
    # Ray's own worker logs may arrive around it; the run's answer is one line of its own.
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("frcnn-bench: ")]
    assert re.match(r"frcnn-bench: training failed: worker [\d, ]+: TooManyBadImages: 2 train images could not be "
                    r"used, more than max_bad_images=1; the latest: .*(file not found|cannot decode)", line), line


@pytest.fixture(scope="module")
def small_coco(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("coco"), synthetic.SyntheticSpec(
        train_images=4, val_images=2, num_categories=3, image_size=64, empty_fraction=0.0, seed=9))


def broken_copy(root: Path, tmp_path: Path, split: str, edit) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    path = copy / "annotations" / f"instances_{split}2017.json"
    edit(path)
    return copy


def edit_json(change):
    def edit(path: Path):
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))
    return edit


# name -> (extra command-line flags, a change to a copy of the data set or None, expected message)
BAD_RUNS = {
    "unknown preset": (["--preset", "9x9"], None, "unknown preset '9x9'; presets: "),
    "batch size 0": (["--batch-size", "0"], None, "batch_size must be at least 1, got 0"),
    "negative lr": (["--lr", "-0.1"], None, "lr must be positive, got -0.1"),
    "fp16": (["--precision", "fp16"], None, "precision 'fp16'"),
    "missing data path": (["--data-root", "/nonexistent/coco"], None,
                          "/nonexistent/coco/annotations/instances_train2017.json: annotation file not found"),
    "backbone weights missing": (["--backbone-weights", "file:///nonexistent/resnet50-0676ba61.pth"], None,
                                 "no such file /nonexistent/resnet50-0676ba61.pth"),
    "backbone weights failing the hash": (["--backbone-weights", "WEIGHTS"], None, "does not match the prefix 0676ba61"),
    "backbone weights unreachable": (["--backbone-weights", "http://127.0.0.1:1/resnet50-0676ba61.pth"], None,
                                     "backbone weights http://127.0.0.1:1/resnet50-0676ba61.pth: cannot reach the server"),
    "annotations truncated": ([], ("train", lambda p: p.write_text(p.read_text()[:100])), "not valid JSON"),
    "annotations not COCO": ([], ("val", lambda p: p.write_text('{"type": "captions"}')), "not a COCO instances file"),
    "unknown image id": ([], ("train", edit_json(lambda d: d["annotations"][0].update(image_id=424242))),
                         "refers to unknown image id 424242"),
    "unknown category": ([], ("val", edit_json(lambda d: d["annotations"][0].update(category_id=12))),
                         "has category id 12, not one of the file's categories"),
    "bbox of three numbers": ([], ("train", edit_json(lambda d: d["annotations"][0].update(bbox=[1, 2, 3]))),
                              "annotation 1 has bbox [1, 2, 3], not four finite numbers"),
    "duplicate image id": ([], ("train", edit_json(lambda d: d["images"][1].update(id=1))), "image id 1 appears twice"),
    "empty training split": ([], ("train", edit_json(lambda d: [a.update(iscrowd=1) for a in d["annotations"]])),
                             "0 usable train images of 4"),
    "empty val split": ([], ("val", edit_json(lambda d: d.update(images=[], annotations=[]))),
                        "0 usable val images of 0"),
}


def main_in_this_process(argv: list[str], capsys) -> tuple[int, str]:
    """`frcnn-bench` (cli.main) run here, without a process of its own: its exit status and its
    stderr, with what the interpreter would print for sys.exit(message). An exception other than
    SystemExit (what would be a traceback) fails the test. Ray, if the command started it, is
    stopped."""
    import ray

    try:
        cli.main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    finally:
        ray.shutdown()
    stderr = capsys.readouterr().err
    if isinstance(code, str):
        return 1, f"{stderr}{code}\n"
    return code or 0, stderr


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_configuration_and_annotations_fail_in_one_line(small_coco, tmp_path, case, capsys, monkeypatch):
    # In this process: each case ends before training, most before Ray starts (the weights'
    # download after Ray's checks); `python -m pipeline` as a process is tested by the runs below.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    flags, change, message = BAD_RUNS[case]
    root = broken_copy(small_coco, tmp_path, *change) if change else small_coco
    if "WEIGHTS" in flags:
        flags = [f if f != "WEIGHTS" else str(tmp_path / "resnet50-0676ba61.pth") for f in flags]
        (tmp_path / "resnet50-0676ba61.pth").write_bytes(b"not the ImageNet weights")
    code, stderr = main_in_this_process(["run", "--preset", "smoke", "--synthetic-train-images", "0",
                                         "--data-root", str(root), "--output-dir", str(tmp_path / "out"), *flags],
                                        capsys)
    assert code != 0
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("frcnn-bench: ") and message in lines[-1], stderr[-2000:]


# Structural problems of an annotation file: the same AnnotationError as the cases above that
# go through the CLI (bbox of three numbers, duplicate image id), checked here without a process
# each. name -> (split, change to a copy of the data set, expected message)
ANNOTATION_PROBLEMS = {
    "bbox null": ("val", edit_json(lambda d: d["annotations"][0].update(bbox=None)),
                  "annotation 1 has bbox None, not four finite numbers"),
    "bbox NaN": ("train", edit_json(lambda d: d["annotations"][0].update(bbox=[float("nan"), 0, 5, 5])),
                 "annotation 1 has bbox [nan, 0, 5, 5], not four finite numbers"),
    "bbox with a string": ("train", edit_json(lambda d: d["annotations"][0].update(bbox=["10", 0, 5, 5])),
                           "annotation 1 has bbox ['10', 0, 5, 5], not four finite numbers"),
    "iscrowd neither 0 nor 1": ("train", edit_json(lambda d: d["annotations"][0].update(iscrowd="no")),
                                "annotation 1 has iscrowd 'no', not 0 or 1"),
    "area a string": ("val", edit_json(lambda d: d["annotations"][0].update(area="big")),
                      "annotation 1 has area 'big', not a finite number >= 0"),
    "category id a string": ("train", edit_json(lambda d: d["annotations"][0].update(category_id="18")),
                             "annotation 1 has category id '18', not one of the file's categories"),
    "annotation without bbox": ("train", edit_json(lambda d: d["annotations"][0].pop("bbox")),
                                "annotation 1 has no 'bbox'"),
    "annotation id a string": ("train", edit_json(lambda d: d["annotations"][0].update(id="a1")),
                               "annotations[0] has id 'a1', not an integer"),
    "annotation not an object": ("train", edit_json(lambda d: d["annotations"].__setitem__(0, 7)),
                                 "annotations[0] is 7, not a JSON object"),
    "duplicate annotation id": ("train", edit_json(lambda d: d["annotations"][1].update(id=1)),
                                "annotation id 1 appears twice"),
    "duplicate category id": ("val", edit_json(lambda d: d["categories"][1].update(id=1)),
                              "category id 1 appears twice"),
    "image without id": ("train", edit_json(lambda d: d["images"][0].pop("id")), "images[0] has no 'id'"),
    "image without width": ("train", edit_json(lambda d: d["images"][0].pop("width")), "image 1 has no 'width'"),
    "image width a string": ("train", edit_json(lambda d: d["images"][0].update(width="64")),
                             "image 1 has width '64', not a positive integer"),
    "image height infinite": ("val", edit_json(lambda d: d["images"][0].update(height=float("inf"))),
                              "image 1000001 has height inf, not a positive integer"),
    "image file name missing": ("train", edit_json(lambda d: d["images"][0].update(file_name=None)),
                                "image 1 has file_name None, not a file name"),
}


@pytest.mark.parametrize("case", sorted(ANNOTATION_PROBLEMS))
def test_each_structural_problem_of_an_annotation_file_is_named(small_coco, tmp_path, case):
    split, edit, message = ANNOTATION_PROBLEMS[case]
    root = broken_copy(small_coco, tmp_path, split, edit)
    with pytest.raises(AnnotationError) as error:
        build_manifest(*split_paths(root, split), drop_empty=split == "train")
    assert str(error.value).startswith(f"{split_paths(root, split)[0]}: ") and message in str(error.value)


def test_a_val_split_with_too_few_usable_images_stops_the_run(ray_head, small_coco, tmp_path):
    """Both val images unreadable, fewer than max_bad_images: no mAP over nothing, one line."""
    root = tmp_path / "coco"
    shutil.copytree(small_coco, root)
    for path in (root / "val2017").glob("*.jpg"):
        path.write_text("not an image")
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "--preset", "smoke", "--synthetic-train-images", "0",
                           "--data-root", str(root), "--output-dir", str(tmp_path / "out"), "--max-failures", "1"],
                          cwd=ROOT, env=venv_env(RAY_ADDRESS=ray_head.address), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 1
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("frcnn-bench: ")]
    assert re.match(r"frcnn-bench: training failed: worker 0: TooFewEvaluated: val: 0 of 2 images could be "
                    r"evaluated, 2 are unusable; the first: .*val2017/\d+\.jpg: cannot decode: .*; a mAP needs at "
                    r"least 1 \(50% of the split\)", line), line
    assert not list((tmp_path / "out").glob("*/result.json"))
