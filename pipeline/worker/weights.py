"""The backbone's weights file: found, or fetched once by the driver, after the cluster's checks.

Sources: "imagenet" (torchvision's ResNet50_Weights.IMAGENET1K_V1 file, from its URL), an
http:// or https:// URL (a mirror), a local path or file:// URL, or "none" (no file).

- A URL's file is downloaded by the driver into the cache folder (by default
  <output_dir>/.weights, which every node sees), named as the URL names it (torch.hub's way); a
  file of that name already there is reused if it passes its hash, and downloaded again if not.
  The workers load that local file: they never download, so nodes without internet are fine.
- The hash: torch.hub's convention, a name like "resnet50-0676ba61.pth" carries the first hex
  digits of the file's SHA-256, which the file must match. A name without them is not checked
  (downloaded and used as it comes, as torch.hub does).
- A download streams to a temporary ".NAME.<random>.partial" in the cache (a unique name: several
  drivers may share the cache) and is hashed as it comes, with a timeout of TIMEOUT_S on each
  wait for the server; it is renamed into place only when whole and matching. On any failure the
  partial file is removed, so nothing half-written is ever in the cache, and the error is one
  line naming the URL and the problem.
"""

import hashlib
import os
import re
import tempfile
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import url2pathname, urlopen

# torchvision's ResNet50_Weights.IMAGENET1K_V1.url, written out so that the driver does not import
# torchvision (tests/worker/test_weights.py).
IMAGENET_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
# torch.hub's convention: "name-<first hex digits of the file's SHA-256>.ext".
HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")
TIMEOUT_S = 60
CHUNK = 1 << 20


class WeightsError(ValueError):
    pass


def download_url(source: str) -> str | None:
    """The URL the driver downloads for `source`: torchvision's for "imagenet", an http(s) URL
    itself; None for a local path, a file:// URL and "none"."""
    if source == "imagenet":
        return IMAGENET_URL
    return source if urlparse(source).scheme in ("http", "https") else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_prefix(name: str) -> str | None:
    """The SHA-256 prefix in a file name (resnet50-0676ba61.pth: 0676ba61), None without one."""
    match = HASH_IN_NAME.search(name)
    return match.group(1) if match else None


def check_digest(what: str, name: str, digest: str) -> None:
    """The SHA-256 `digest` of the file named `name` must start with the name's prefix, if it has one."""
    prefix = hash_prefix(name)
    if prefix and not digest.startswith(prefix):
        raise WeightsError(f"{what}: SHA-256 {digest[:12]}... does not match the prefix {prefix} in its name "
                           "(corrupt or wrong file)")


def check_hash(path: Path) -> None:
    """When the file name carries a SHA-256 prefix (resnet50-0676ba61.pth), the file must match it."""
    if hash_prefix(path.name):
        check_digest(str(path), path.name, sha256_of(path))


def checked_weights_file(source: str) -> Path:
    """The local weights file a path or file:// URL names, which must exist and match its name's
    hash prefix. A download is refused: only the driver downloads (see `fetch`)."""
    if download_url(source):
        raise WeightsError(f"backbone weights {source!r}: a download, which only the driver makes "
                           "(pipeline.worker.weights.fetch); give the file it fetched")
    path = Path(url2pathname(urlparse(source).path)) if source.startswith("file://") else Path(source)
    if not path.is_file():
        raise WeightsError(f"backbone weights {source!r}: no such file {path}")
    check_hash(path)
    return path


def fetch(url: str, cache: Path) -> Path:
    """`url`'s file in `cache`, downloaded unless a file of its name there passes its hash."""
    name = Path(urlparse(url).path).name
    if not name:
        raise WeightsError(f"backbone weights {url}: the URL names no file")
    target = cache / name
    prefix = hash_prefix(name)
    if target.is_file() and (prefix is None or sha256_of(target).startswith(prefix)):
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=cache, prefix=f".{name}.", suffix=".partial")
    except OSError as e:
        raise WeightsError(f"backbone weights {url}: cannot write to the cache {cache} ({e.strerror})") from None
    try:
        with os.fdopen(handle, "wb") as file:
            digest = download(url, file)
        check_digest(f"backbone weights {url}", name, digest)
        os.chmod(partial, 0o644)  # mkstemp's 0600 would hide it from workers and cache sharers of other users
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)  # gone once renamed into place
    return target


def download(url: str, file) -> str:
    """The body of `url` written to `file`; its SHA-256, computed as it comes. An HTTP error, no
    answer, or a body shorter than its Content-Length is a WeightsError."""
    digest, done, total = hashlib.sha256(), 0, None
    try:
        with urlopen(url, timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            while chunk := response.read(CHUNK):
                file.write(chunk)
                digest.update(chunk)
                done += len(chunk)
    except HTTPError as e:
        raise WeightsError(f"backbone weights {url}: the server answered HTTP {e.code} {e.reason}") from None
    except URLError as e:
        raise WeightsError(f"backbone weights {url}: cannot reach the server ({e.reason})") from None
    except TimeoutError:
        raise WeightsError(f"backbone weights {url}: no data from the server for {TIMEOUT_S} s, at "
                           f"{progress(done, total)}") from None
    except (OSError, HTTPException) as e:
        raise WeightsError(f"backbone weights {url}: the download stopped at {progress(done, total)} "
                           f"({type(e).__name__}: {e})") from None
    if total is not None and done != total:
        raise WeightsError(f"backbone weights {url}: the connection ended at {progress(done, total)}")
    return digest.hexdigest()


def progress(done: int, total: int | None) -> str:
    return f"{done:,} of {total:,} bytes" if total is not None else f"{done:,} bytes"
