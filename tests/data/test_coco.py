"""`frcnn-bench coco` against a real HTTP server on 127.0.0.1 serving small COCO-shaped archives."""

import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline import cli
from pipeline.data import coco, synthetic
from pipeline.data.manifest import build_manifest, split_paths

SPEC = synthetic.SyntheticSpec(train_images=3, val_images=2, num_categories=2, image_size=48)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synthetic"), SPEC)


@pytest.fixture(scope="module")
def archives(data, tmp_path_factory):
    """The three archives, as COCO's are: images stored under train2017/ and val2017/, annotations
    deflated (with a file `run` does not need, which stays out)."""
    folder = tmp_path_factory.mktemp("archives")
    for split in ("train2017", "val2017"):
        with zipfile.ZipFile(folder / f"{split}.zip", "w", zipfile.ZIP_STORED) as archive:
            archive.write(data / split, split)
            for image in sorted((data / split).iterdir()):
                archive.write(image, f"{split}/{image.name}")
    with zipfile.ZipFile(folder / "annotations_trainval2017.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for name in coco.ANNOTATION_FILES:
            archive.write(data / name, name)
        archive.writestr("annotations/captions_train2017.json", "{}")
    return folder


@pytest.fixture(autouse=True)
def small_counts(monkeypatch):
    monkeypatch.setattr(coco, "IMAGE_COUNTS", {"train2017": SPEC.train_images, "val2017": SPEC.val_images})
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


class ArchiveHandler(BaseHTTPRequestHandler):
    """Serves server.files by path with Range support. server.range_mode "ignore" answers 200 to a
    Range request, "shifted" a 206 starting one byte late; a path in server.cut gets half its
    body once, then the connection closes. Every request is logged in server.requests."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body: bool):
        server = self.server
        server.requests.append((self.command, self.path, self.headers.get("Range")))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if asked and server.range_mode != "ignore":
            start = int(asked[1]) + (server.range_mode == "shifted")
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if body:
            payload = data[start:]
            if self.path in server.cut:
                server.cut.remove(self.path)
                payload, self.close_connection = payload[:len(payload) // 2], True
            self.wfile.write(payload)


@pytest.fixture
def server(archives):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ArchiveHandler)
    httpd.files = {f"/{folder}/{name}": (archives / name).read_bytes() for name, folder in coco.ARCHIVES.items()}
    httpd.requests, httpd.cut, httpd.range_mode = [], set(), "normal"
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def gets(server) -> list:
    return [(path, range_) for method, path, range_ in server.requests if method == "GET"]


def assert_complete(dest, archives):
    for split, count in (("train", SPEC.train_images), ("val", SPEC.val_images)):
        table, stats = build_manifest(*split_paths(dest, split), drop_empty=False)
        assert stats.images == count and all(path.startswith(str(dest.resolve())) for path in table["path"].to_pylist())
    with zipfile.ZipFile(archives / "train2017.zip") as archive:
        for name in archive.namelist()[1:]:
            assert (dest / name).read_bytes() == archive.read(name)
    assert not (dest / "annotations" / "captions_train2017.json").exists()
    assert sorted(p.name for p in dest.iterdir()) == [coco.MARKER, "annotations", "train2017", "val2017"]


def test_fetch_then_a_second_run_does_nothing(server, archives, tmp_path, capsys):
    dest = tmp_path / "coco"
    coco.main([str(dest), "--mirror", server.url])
    assert_complete(dest, archives)
    assert sorted(gets(server)) == sorted((path, None) for path in server.files)
    assert re.search(r"train2017.zip: .* MB/s, ETA", capsys.readouterr().out)
    server.requests.clear()
    coco.main([str(dest), "--mirror", server.url])
    assert server.requests == []
    assert "already holds COCO 2017" in capsys.readouterr().out


def test_cut_download_resumes_with_range(server, archives, tmp_path):
    dest, path = tmp_path / "coco", "/zips/train2017.zip"
    server.cut.add(path)
    with pytest.raises(coco.CocoError, match="train2017.zip: the connection ended at .*rerun to resume"):
        coco.main([str(dest), "--mirror", server.url])
    part = dest / ".download" / "train2017.zip.part"
    half = len(server.files[path]) // 2
    assert part.stat().st_size == half
    assert not (dest / "train2017").exists()
    server.requests.clear()
    coco.main([str(dest), "--mirror", server.url])
    assert gets(server) == [(path, f"bytes={half}-")]
    assert_complete(dest, archives)


def test_server_ignoring_range_restarts_from_zero(server, archives, tmp_path):
    dest = tmp_path / "coco"
    server.cut.add("/zips/val2017.zip")
    with pytest.raises(coco.CocoError):
        coco.main([str(dest), "--mirror", server.url])
    server.range_mode = "ignore"
    coco.main([str(dest), "--mirror", server.url])
    assert_complete(dest, archives)


def test_wrong_content_range_is_refused(server, tmp_path):
    dest = tmp_path / "coco"
    server.cut.add("/zips/val2017.zip")
    with pytest.raises(coco.CocoError):
        coco.main([str(dest), "--mirror", server.url])
    server.range_mode = "shifted"
    with pytest.raises(coco.CocoError, match=r"val2017.zip: asked for the bytes from \d+, the server answered 206"):
        coco.main([str(dest), "--mirror", server.url])


def test_corrupt_archive_is_refused_by_name_and_deleted(server, archives, data, tmp_path):
    dest, path = tmp_path / "coco", "/zips/train2017.zip"
    body = bytearray(server.files[path])
    image = next((data / "train2017").iterdir()).read_bytes()
    at = body.find(image) + len(image) // 2
    body[at:at + 4] = bytes(b ^ 0xFF for b in body[at:at + 4])
    server.files[path] = bytes(body)
    with pytest.raises(coco.CocoError, match=r"train2017.zip: member train2017/\S+.jpg fails its CRC check; "
                                             "deleted, rerun to download it again"):
        coco.main([str(dest), "--mirror", server.url])
    assert sorted(p.name for p in dest.iterdir()) == [".download"]
    assert not (dest / ".download" / "train2017.zip").exists()
    server.files[path], server.requests = (archives / "train2017.zip").read_bytes(), []
    coco.main([str(dest), "--mirror", server.url])
    assert gets(server) == [(path, None)]
    assert_complete(dest, archives)


def test_too_little_disk_is_refused_before_any_download(server, tmp_path, monkeypatch, capsys):
    total = sum(len(data) for data in server.files.values())
    monkeypatch.setattr(coco, "free_bytes", lambda path: total)
    with pytest.raises(SystemExit) as exit:
        cli.main(["coco", str(tmp_path / "coco"), "--mirror", server.url])
    message = str(exit.value.code)
    assert re.fullmatch(rf"frcnn-bench: .*coco: not enough free disk space: needs [\d,]+ bytes "
                        rf"\({total:,} to download, about [\d,]+ unpacked\), {total:,} available", message)
    assert gets(server) == []


def test_from_dir_unpacks_archives_on_disk(archives, tmp_path):
    dest = tmp_path / "coco"
    coco.main([str(dest), "--from", str(archives)])
    assert_complete(dest, archives)
    assert sorted(p.name for p in archives.iterdir()) == sorted(coco.ARCHIVES)


def test_from_dir_with_a_missing_archive_names_it(archives, tmp_path):
    for name in ("annotations_trainval2017.zip", "train2017.zip"):
        (tmp_path / name).symlink_to(archives / name)
    with pytest.raises(coco.CocoError, match=r"val2017.zip: not found"):
        coco.main([str(tmp_path / "coco"), "--from", str(tmp_path)])


def test_unreadable_annotations_leave_nothing_where_run_reads(archives, tmp_path):
    source, dest = tmp_path / "archives", tmp_path / "coco"
    source.mkdir()
    for name in ("val2017.zip", "train2017.zip"):
        (source / name).symlink_to(archives / name)
    with zipfile.ZipFile(source / "annotations_trainval2017.zip", "w") as archive:
        archive.writestr("annotations/instances_train2017.json", '{"images": []}')
        archive.writestr("annotations/instances_val2017.json", "{}")
    with pytest.raises(coco.CocoError, match=r"annotations_trainval2017.zip: annotations/instances_train2017.json: "
                                             "not a COCO instances file .*; left as it is"):
        coco.main([str(dest), "--from", str(source)])
    assert list(dest.iterdir()) == []
    assert (source / "annotations_trainval2017.zip").exists()


def test_wrong_image_count_is_refused(archives, tmp_path, monkeypatch):
    monkeypatch.setitem(coco.IMAGE_COUNTS, "train2017", SPEC.train_images + 1)
    with pytest.raises(coco.CocoError, match=rf"train2017.zip: holds {SPEC.train_images} JPEGs under train2017/, "
                                             rf"COCO 2017 has {SPEC.train_images + 1}; left as it is"):
        coco.main([str(tmp_path / "coco"), "--from", str(archives)])
    assert list((tmp_path / "coco").iterdir()) == []
