"""`frcnn-bench coco DEST`: COCO 2017 downloaded, checked and unpacked into the layout `run` reads:
DEST/annotations/instances_{train,val}2017.json, DEST/train2017/*.jpg and DEST/val2017/*.jpg.

Sources: annotations_trainval2017.zip, val2017.zip and train2017.zip from images.cocodataset.org
(BASE/annotations/annotations_trainval2017.zip, BASE/zips/val2017.zip, BASE/zips/train2017.zip).
`--mirror URL` replaces BASE and keeps those paths. `--from DIR` reads the three archives from DIR
(side by side) in place and downloads nothing.

The rules:
- Disk: before any download, DEST's free space must hold the bytes still to download (sizes from
  HEAD's Content-Length, less what partial downloads hold) and the unpacked size, estimated as
  1.05 x the image archives (JPEGs do not compress; 5% for file-system blocks) and 2 x the
  annotation archive (JSON compresses about 2:1; only the two instances files are unpacked).
- Resume: a download goes to DEST/.download/NAME.part, renamed NAME once whole. A rerun asks for
  the rest with `Range: bytes=N-` and takes a 206 whose Content-Range starts at N; a 200 (a server
  that ignores Range) restarts the file from zero; another range is an error. A connection that
  ends early is an error; the next run resumes.
- Checks: every member's CRC, 118,287 JPEGs under train2017/ and 5,000 under val2017/, both
  instances files readable as COCO instances files. The error names the archive and its problem;
  a downloaded archive that fails is deleted so that a rerun downloads it again (one given with
  --from is never touched).
- Unpacking: into DEST/.unpack/, removed on failure; the folders are renamed into place at the
  end, so `run` never reads a half-written one. DEST/.coco-complete is written last: with it a
  rerun does nothing. The downloaded archives are deleted then.
"""

import argparse
import shutil
import sys
import time
import zipfile
import zlib
from http.client import HTTPException
from pathlib import Path
from urllib.request import Request, urlopen

from pipeline.data.manifest import AnnotationError, load_annotations

OFFICIAL = "http://images.cocodataset.org"
# Archive -> its folder under the base URL; smallest first, so a bad source shows early.
ARCHIVES = {"annotations_trainval2017.zip": "annotations", "val2017.zip": "zips", "train2017.zip": "zips"}
UNPACKED_FACTOR = {"annotations_trainval2017.zip": 2.0, "val2017.zip": 1.05, "train2017.zip": 1.05}
IMAGE_COUNTS = {"train2017": 118_287, "val2017": 5_000}
ANNOTATION_FILES = ("annotations/instances_train2017.json", "annotations/instances_val2017.json")
MARKER = ".coco-complete"
CHUNK = 1 << 20
TIMEOUT_S = 60


class CocoError(RuntimeError):
    """A download, archive or folder that cannot be used; the message names it and the problem."""


def free_bytes(path: Path) -> int:
    """Free bytes on the file system of `path` (the one reading of the disk, which tests replace)."""
    return shutil.disk_usage(path).free


def remote_size(url: str) -> int:
    """The archive's size from a HEAD request's Content-Length."""
    try:
        with urlopen(Request(url, method="HEAD"), timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
    except (OSError, HTTPException) as e:
        raise CocoError(f"{url}: {e}") from None
    if length is None:
        raise CocoError(f"{url}: the server gives no Content-Length, so neither disk space nor completeness "
                        "can be checked")
    return int(length)


def show(name: str, done: int, total: int, start: float, resumed_from: int, end: str) -> None:
    """One progress line: MB done, MB/s since this run's start and the ETA."""
    rate = (done - resumed_from) / max(time.monotonic() - start, 1e-6)
    eta = (total - done) / rate if rate > 0 else 0
    print(f"{name}: {done / 1e6:,.0f} of {total / 1e6:,.0f} MB, {rate / 1e6:.1f} MB/s, "
          f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s", end=end, flush=True)


def download(url: str, target: Path, total: int) -> None:
    """`url` into `target` through target.part, resumed with a Range request when a part exists."""
    part = target.with_name(target.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    if done < total:
        headers = {"Range": f"bytes={done}-"} if done else {}
        try:
            with urlopen(Request(url, headers=headers), timeout=TIMEOUT_S) as response:
                if done and response.status == 200:
                    print(f"{target.name}: the server ignores Range; downloading it again from the start")
                    done = 0
                elif done and not (response.headers.get("Content-Range") or "").startswith(f"bytes {done}-"):
                    raise CocoError(f"{url}: asked for the bytes from {done}, the server answered "
                                    f"{response.status} with Content-Range {response.headers.get('Content-Range')!r}")
                copy(response, part, done, total, target.name)
        except (OSError, HTTPException) as e:
            raise CocoError(f"{url}: download stopped at {part.stat().st_size if part.exists() else 0:,} of "
                            f"{total:,} bytes ({e}); rerun to resume") from None
    done = part.stat().st_size
    if done != total:
        raise CocoError(f"{url}: the connection ended at {done:,} of {total:,} bytes; rerun to resume")
    part.rename(target)


def copy(response, part: Path, done: int, total: int, name: str) -> None:
    """The response body appended to `part` (written anew when `done` is 0), with progress at most every second."""
    tty = sys.stdout.isatty()
    start = shown = time.monotonic()
    resumed_from = done
    with open(part, "ab" if done else "wb") as file:
        while chunk := response.read(CHUNK):
            file.write(chunk)
            done += len(chunk)
            if time.monotonic() - shown >= 1:
                shown = time.monotonic()
                show(name, done, total, start, resumed_from, "\r" if tty else "\n")
    show(name, done, total, start, resumed_from, "\n")


def check_archive(path: Path, downloaded: bool) -> list[str]:
    """The members to unpack, once every CRC is right and the archive holds what COCO's does."""
    problem, members = None, []
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            bad = archive.testzip()
        if bad:
            problem = f"member {bad} fails its CRC check"
        elif path.name.startswith("annotations"):
            members = [name for name in ANNOTATION_FILES if name in names]
            if len(members) < len(ANNOTATION_FILES):
                problem = f"lacks {', '.join(sorted(set(ANNOTATION_FILES) - set(members)))}"
        else:
            folder = path.name.removesuffix(".zip")
            members = [name for name in names if name.startswith(f"{folder}/")]
            images = sum(name.endswith(".jpg") for name in members)
            if images != IMAGE_COUNTS[folder]:
                problem = f"holds {images:,} JPEGs under {folder}/, COCO 2017 has {IMAGE_COUNTS[folder]:,}"
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        problem = f"not a readable zip archive ({e})"
    if problem:
        reject(path, problem, downloaded)
    return members


def reject(path: Path, problem: str, downloaded: bool):
    """Raise the archive's error; a downloaded archive is deleted first, so that a rerun fetches it again."""
    if downloaded:
        path.unlink(missing_ok=True)
    raise CocoError(f"{path}: {problem}; " + ("deleted, rerun to download it again" if downloaded else "left as it is"))


def unpack(archives: dict[str, Path], dest: Path, downloaded: bool) -> None:
    """Check and unpack every archive into DEST/.unpack, then rename its folders into DEST."""
    staging = dest / ".unpack"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for path in archives.values():
            members = check_archive(path, downloaded)
            print(f"{path.name}: checked, unpacking {len(members):,} members", flush=True)
            with zipfile.ZipFile(path) as archive:
                archive.extractall(staging, members)
        for name in ANNOTATION_FILES:
            try:
                load_annotations(staging / name)
            except AnnotationError as e:
                reject(archives["annotations_trainval2017.zip"], str(e).removeprefix(f"{staging}/"), downloaded)
        for folder in ("annotations", "val2017", "train2017"):
            (staging / folder).rename(dest / folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch(dest: Path, mirror: str = OFFICIAL, from_dir: Path | None = None) -> None:
    """COCO 2017 in DEST, from `mirror` or the archives in `from_dir`; nothing to do when DEST is complete."""
    if (dest / MARKER).exists():
        print(f"{dest} already holds COCO 2017 ({MARKER} is there); nothing to do")
        return
    for folder in ("annotations", "train2017", "val2017"):
        if (dest / folder).exists():
            raise CocoError(f"{dest / folder}: already exists, but {dest} lacks {MARKER} (an earlier copy, or "
                            "another data set); move it away or choose another DEST")
    downloads = dest / ".download"
    dest.mkdir(parents=True, exist_ok=True)
    if from_dir is None:
        downloads.mkdir(exist_ok=True)
    archives = {name: (from_dir or downloads) / name for name in ARCHIVES}
    urls = {name: f"{mirror.rstrip('/')}/{folder}/{name}" for name, folder in ARCHIVES.items()}
    sizes, to_download = {}, {}
    for name, path in archives.items():
        if path.exists():
            sizes[name] = path.stat().st_size
        elif from_dir:
            raise CocoError(f"{path}: not found (--from needs {', '.join(ARCHIVES)} side by side)")
        else:
            sizes[name] = remote_size(urls[name])
            part = path.with_name(name + ".part")
            to_download[name] = sizes[name] - (part.stat().st_size if part.exists() else 0)
    unpacked = int(sum(UNPACKED_FACTOR[name] * size for name, size in sizes.items()))
    needed, free = sum(to_download.values()) + unpacked, free_bytes(dest)
    if needed > free:
        raise CocoError(f"{dest}: not enough free disk space: needs {needed:,} bytes ({sum(to_download.values()):,} "
                        f"to download, about {unpacked:,} unpacked), {free:,} available")
    for name in to_download:
        download(urls[name], archives[name], sizes[name])
    unpack(archives, dest, downloaded=from_dir is None)
    (dest / MARKER).write_text("COCO 2017 unpacked and checked by frcnn-bench coco\n")
    shutil.rmtree(downloads, ignore_errors=True)
    print(f"COCO 2017 is in {dest}; train on it with `frcnn-bench run --data-root {dest}`")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="frcnn-bench coco", description="download, check and unpack COCO 2017 "
                                     "into the layout `frcnn-bench run --data-root DEST` reads")
    parser.add_argument("dest", type=Path, metavar="DEST", help="data root (annotations/, train2017/, val2017/)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--mirror", default=OFFICIAL, metavar="URL", help=f"base URL holding annotations/ and zips/ "
                        f"(default {OFFICIAL})")
    source.add_argument("--from", dest="from_dir", type=Path, metavar="DIR", help="folder holding the three archives; "
                        "no download")
    args = parser.parse_args(argv)
    fetch(args.dest, args.mirror, args.from_dir)
