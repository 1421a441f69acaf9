"""The backbone's weights from a URL: fetched once by the driver into the cache, checked against
the hash in the name, and nothing half-written left behind when the download fails. A real HTTP
server on 127.0.0.1 serves a small state dict."""

import hashlib
import io
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from pipeline.config import resolve
from pipeline.run import fetch_weights, prepare, worker_config
from pipeline.worker.model import load_backbone_state
from pipeline.worker.weights import IMAGENET_URL, WeightsError, fetch


class Handler(BaseHTTPRequestHandler):
    """GET /NAME: the server's files[NAME] = (body, the Content-Length announced), or a 404. A
    Content-Length above the body's size, then the end of the connection (HTTP/1.0), is a
    dropped connection."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path[1:] not in self.server.files:
            self.send_error(404)
            return
        body, length = self.server.files[self.path[1:]]
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # a proxy of the environment must not see these requests
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests = {}, []
    httpd.url = lambda name: f"http://127.0.0.1:{httpd.server_port}/{name}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(scope="module")
def state():
    """A small state dict, its bytes as torch.save writes them, and its torch.hub-style name."""
    torch.manual_seed(0)
    weights = {"conv1.weight": torch.randn(4, 3, 3, 3), "bn1.running_mean": torch.randn(4)}
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    body = buffer.getvalue()
    return weights, body, f"resnet50-{hashlib.sha256(body).hexdigest()[:8]}.pth"


def serve(server, name: str, body: bytes, length: int | None = None) -> str:
    server.files[name] = (body, len(body) if length is None else length)
    return server.url(name)


def assert_same(loaded: dict, weights: dict) -> None:
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)


def failure(url: str, cache) -> str:
    """The message of fetch's one-line WeightsError, once nothing is left in the cache."""
    with pytest.raises(WeightsError) as caught:
        fetch(url, cache)
    assert sorted(p.name for p in cache.iterdir()) == []  # no partial file, no target
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_downloaded_once_into_the_cache_and_loaded(server, state, tmp_path):
    weights, body, name = state
    url = serve(server, name, body)
    cache = tmp_path / "cache"
    assert fetch(url, cache) == cache / name
    assert sorted(p.name for p in cache.iterdir()) == [name]
    assert (cache / name).stat().st_mode & 0o777 == 0o644  # readable by the workers, whoever runs them
    assert_same(load_backbone_state(str(cache / name)), weights)
    assert fetch(url, cache) == cache / name  # from the cache: the server is not asked again
    assert server.requests == [f"/{name}"]


def test_a_cached_file_failing_its_hash_is_downloaded_again(server, state, tmp_path):
    weights, body, name = state
    url = serve(server, name, body)
    (tmp_path / name).write_bytes(b"not these weights")
    assert fetch(url, tmp_path) == tmp_path / name
    assert_same(load_backbone_state(str(tmp_path / name)), weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name] and len(server.requests) == 1


def test_hash_mismatch_names_the_url_and_both_prefixes(server, state, tmp_path):
    _, _, name = state
    other = b"other bytes under that name"
    url = serve(server, name, other)
    got = hashlib.sha256(other).hexdigest()
    assert failure(url, tmp_path) == (f"backbone weights {url}: SHA-256 {got[:12]}... does not match the prefix "
                                      f"{name[9:17]} in its name (corrupt or wrong file)")


def test_http_error_names_the_url_and_the_status(server, tmp_path):
    url = server.url("resnet50-0676ba61.pth")
    assert failure(url, tmp_path) == f"backbone weights {url}: the server answered HTTP 404 Not Found"


def test_dropped_connection_names_the_bytes_received(server, state, tmp_path):
    _, body, name = state
    url = serve(server, name, body[:1000], length=len(body))
    assert failure(url, tmp_path) == (f"backbone weights {url}: the connection ended at 1,000 of {len(body):,} "
                                      f"bytes")


def test_unreachable_host_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/resnet50-0676ba61.pth"
    assert re.fullmatch(rf"backbone weights {re.escape(url)}: cannot reach the server \(.*refused.*\)",
                        failure(url, tmp_path))


def test_a_cache_that_cannot_be_written_is_named(server, state, tmp_path):
    _, body, name = state
    url = serve(server, name, body)
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with pytest.raises(WeightsError, match=rf"^backbone weights {re.escape(url)}: cannot write to the cache "
                                           rf"{re.escape(str(tmp_path / 'cache'))} \(File exists\)$"):
        fetch(url, tmp_path / "cache")
    assert server.requests == []


def test_a_name_without_a_hash_prefix_is_not_checked(server, tmp_path):
    """torch.hub's rule: only a name with the prefix is checked; any bytes under another are used."""
    url = serve(server, "resnet50.pth", b"whatever the mirror holds")
    assert fetch(url, tmp_path).read_bytes() == b"whatever the mirror holds"


def test_the_driver_fetches_a_url_and_the_workers_get_the_local_file(server, state, tiny_coco, tmp_path):
    """The driver downloads into <output_dir>/.weights (or --weights-cache) once the plan is made
    and the cluster checked (prepare() itself downloads nothing), the nodes' check sees that file
    (Plan.weights), the workers' config names it, and the run's config keeps the URL the user gave
    (result.json, config.json). A rerun reuses the file."""
    weights, body, name = state
    url = serve(server, name, body)
    config = resolve("smoke", data_root=str(tiny_coco), synthetic_train_images=0, output_dir=str(tmp_path / "out"),
                     backbone_weights=url)
    cached = (tmp_path / "out" / ".weights" / name).resolve()
    assert prepare(config).weights == [] and server.requests == []
    plan = fetch_weights(prepare(config))
    assert plan.weights == [cached] and plan.config.backbone_weights == url
    loop = worker_config(plan, collector=None)
    assert loop.backbone_file == str(cached) and loop.config.backbone_weights == url
    assert_same(load_backbone_state(loop.backbone_file), weights)
    assert fetch_weights(prepare(config)).weights == [cached] and len(server.requests) == 1
    elsewhere = resolve("smoke", data_root=str(tiny_coco), synthetic_train_images=0, output_dir=str(tmp_path / "out"),
                        backbone_weights=url, weights_cache=str(tmp_path / "cache"))
    assert worker_config(fetch_weights(prepare(elsewhere)), collector=None).backbone_file == str((tmp_path / "cache" / name).resolve())


def test_the_imagenet_url_is_torchvisions():
    from torchvision.models import ResNet50_Weights

    assert IMAGENET_URL == ResNet50_Weights.IMAGENET1K_V1.url
