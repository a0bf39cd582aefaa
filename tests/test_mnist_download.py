"""Downloads against a local HTTP server on 127.0.0.1 serving good, corrupt, truncated and missing files."""

from __future__ import annotations

import collections
import gzip
import hashlib
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from odeflux.mnist import MNISTDataError, load_mnist
from odeflux.mnist import download as dl
from odeflux.mnist.download import MIRRORS, MIRRORS_ENV, MNIST_FILES, RemoteFile, download_file, mirrors_from_env


def _find_canonical() -> Path | None:
    for d in (os.environ.get("ODEFLUX_DATA_DIR"), Path(__file__).resolve().parents[2] / "shared/data/mnist"):
        if d and (Path(d) / "train-images-idx3-ubyte.gz").is_file():
            return Path(d)
    return None


CANONICAL = _find_canonical()
needs_canonical = pytest.mark.skipif(CANONICAL is None, reason="canonical MNIST files not found")

PAYLOAD = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
BLOB = RemoteFile("blob.bin", len(PAYLOAD), hashlib.md5(PAYLOAD).hexdigest(), hashlib.sha256(PAYLOAD).hexdigest())


class Handler(BaseHTTPRequestHandler):
    """``/<behaviour>/<name>``: how to answer is the first path component."""

    files: dict[str, bytes] = {}
    hits: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        with self.lock:
            self.hits[self.path] += 1
            count = self.hits[self.path]
        _, mode, name = self.path.split("/", 2)
        body = self.files.get(name)
        if body is None or mode == "missing":
            self.send_error(404)
            return
        if mode == "close":  # hang up without answering
            self.close_connection = True
            return
        if mode == "flaky" and count <= 2:
            self.send_error(503)
            return
        if mode == "slow":
            time.sleep(1.0)
        if mode == "corrupt":
            body = body[:100] + bytes([body[100] ^ 0xFF]) + body[101:]
        if mode == "big":
            body = body + b"\0" * 1000
        length = len(body)
        if mode in ("truncated", "short"):
            body = body[: len(body) // 2]
        self.send_response(200)
        if mode != "short":  # "short" ends the body by closing the connection
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients hanging up early (timeouts, oversize) are part of the tests


@pytest.fixture(scope="module")
def server():
    files = {"blob.bin": PAYLOAD}
    if CANONICAL is not None:
        for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
            files[name] = (CANONICAL / name).read_bytes()
    Handler.files = files
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def hits():
    Handler.hits.clear()
    return Handler.hits


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.delenv("ODEFLUX_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(MIRRORS_ENV, "http://127.0.0.1:9/")  # nothing listens on port 9: never the internet


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def fetch(dest, mirrors, **kwargs):
    kwargs.setdefault("backoff", 0)
    return download_file(BLOB, dest, mirrors=mirrors, quiet=True, **kwargs)


def test_good_mirror(server, hits, tmp_path):
    path = fetch(tmp_path / "c", [f"{server}/good/"])
    assert path == tmp_path / "c" / "blob.bin" and path.read_bytes() == PAYLOAD
    assert leftovers(tmp_path / "c") == ["blob.bin"]
    assert hits == {"/good/blob.bin": 1}


def test_existing_file_is_kept_without_a_request(server, hits, tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"already here")
    assert fetch(tmp_path, [f"{server}/good/"]).read_bytes() == b"already here"
    assert not hits


@pytest.mark.parametrize("bad, tries", [("corrupt", 1), ("missing", 1), ("truncated", 3), ("close", 3), ("big", 1)])
def test_good_mirror_used_after_a_bad_one(server, hits, tmp_path, bad, tries):
    """Permanent failures (checksum, 404, oversize) skip to the next mirror; transient ones retry first."""
    path = fetch(tmp_path, [f"{server}/{bad}/", f"{server}/good/"], retries=3)
    assert path.read_bytes() == PAYLOAD
    assert hits == {f"/{bad}/blob.bin": tries, "/good/blob.bin": 1}
    assert leftovers(tmp_path) == ["blob.bin"]


def test_transient_errors_are_retried_with_backoff(server, hits, tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr(dl.time, "sleep", sleeps.append)
    path = fetch(tmp_path, [f"{server}/flaky/"], retries=3, backoff=0.25)
    assert path.read_bytes() == PAYLOAD
    assert hits == {"/flaky/blob.bin": 3}  # 503, 503, then the file
    assert sleeps == [0.25, 0.5]


def test_all_mirrors_bad_gives_one_clear_error_and_no_files(server, hits, tmp_path):
    mirrors = [f"{server}/{m}/" for m in ("corrupt", "truncated", "short", "missing", "close", "big")]
    with pytest.raises(MNISTDataError) as exc:
        fetch(tmp_path, mirrors, retries=2)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("could not download blob.bin: ")
    served = hashlib.md5(PAYLOAD[:100] + bytes([PAYLOAD[100] ^ 255]) + PAYLOAD[101:]).hexdigest()
    assert f"checksum mismatch: expected MD5 {BLOB.md5}, found {served}" in msg
    for mode in ("truncated", "short"):  # with and without a Content-Length
        assert f"{mode}/blob.bin (attempt 2/2): truncated: got {len(PAYLOAD) // 2} of {len(PAYLOAD)} bytes" in msg
    assert "HTTP 404" in msg and "RemoteDisconnected" in msg and "larger than the expected" in msg
    assert "--data-dir" in msg and MIRRORS_ENV in msg
    assert hits["/truncated/blob.bin"] == 2 and hits["/corrupt/blob.bin"] == 1
    assert leftovers(tmp_path) == []  # nothing half-written, no temporary file


def test_timeout_is_short_not_a_hang(server, hits, tmp_path):
    with pytest.raises(MNISTDataError, match="timed out"):
        fetch(tmp_path, [f"{server}/slow/"], retries=1, timeout=0.2)
    assert leftovers(tmp_path) == []


def test_interrupted_write_leaves_nothing(server, tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(dl.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch(tmp_path, [f"{server}/good/"])
    assert leftovers(tmp_path) == []


def test_stale_temporary_files_are_cleaned_up(server, tmp_path):
    stale, fresh = tmp_path / ".blob.bin.dead.part", tmp_path / ".blob.bin.live.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fetch(tmp_path, [f"{server}/good/"])
    assert leftovers(tmp_path) == [fresh.name, "blob.bin"]  # another process's live download is left alone


def test_unusable_urls(tmp_path):
    with pytest.raises(MNISTDataError, match="unknown url type"):
        fetch(tmp_path, ["nota://url/"])
    with pytest.raises(MNISTDataError, match="no mirrors given"):
        fetch(tmp_path, [])
    with pytest.raises(ValueError, match="retries"):
        fetch(tmp_path, ["http://127.0.0.1:9/"], retries=0)


def test_mirrors_from_env(monkeypatch):
    monkeypatch.setenv(MIRRORS_ENV, "http://a/x/, http://b/  http://c/")
    assert mirrors_from_env() == ("http://a/x/", "http://b/", "http://c/")
    monkeypatch.delenv(MIRRORS_ENV)
    assert mirrors_from_env() == MIRRORS
    assert MIRRORS == ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")


@needs_canonical
def test_known_sizes_and_checksums_match_the_canonical_files():
    sums = dict(line.split()[::-1] for line in (CANONICAL / "SHA256SUMS").read_text().splitlines() if line.strip())
    readme = (CANONICAL / "README.md").read_text()
    assert sorted(MNIST_FILES) == sorted(n for n in sums if n.endswith(".gz"))
    for name, remote in MNIST_FILES.items():
        data = (CANONICAL / name).read_bytes()
        assert remote.name == name and remote.size == len(data)
        assert remote.sha256 == hashlib.sha256(data).hexdigest() == sums[name]
        assert remote.md5 == hashlib.md5(data).hexdigest() and remote.md5 in readme


# --- end to end: load_mnist with an empty cache ---------------------------------------------------


@needs_canonical
def test_load_mnist_downloads_into_cache_once(server, hits, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRRORS_ENV, f"{server}/corrupt/ {server}/good/")
    x, y = load_mnist("test")
    cache = tmp_path / "xdg" / "odeflux" / "mnist"
    assert leftovers(cache) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    for name in leftovers(cache):
        assert (cache / name).read_bytes() == (CANONICAL / name).read_bytes()
    assert hits["/corrupt/t10k-images-idx3-ubyte.gz"] == 1 and hits["/good/t10k-images-idx3-ubyte.gz"] == 1
    expected = np.frombuffer(gzip.decompress((CANONICAL / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:], np.uint8)
    assert x.shape == (10000, 1, 28, 28) and torch.equal(y, torch.from_numpy(expected.astype(np.int64)))
    hits.clear()
    x2, _ = load_mnist("test", n=100)  # now served from the cache
    assert not hits and torch.equal(x2, x[:100])


@needs_canonical
def test_load_mnist_when_every_mirror_fails(server, hits, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRRORS_ENV, f"{server}/corrupt/ {server}/missing/")
    with pytest.raises(MNISTDataError, match="could not download t10k-images-idx3-ubyte.gz") as exc:
        load_mnist("test")
    assert "\n" not in str(exc.value)
    assert leftovers(tmp_path / "xdg" / "odeflux" / "mnist") == []


def test_default_run_makes_no_request(server, hits, monkeypatch):
    """The 1500-image default on an empty cache comes from the package, not the network."""
    monkeypatch.setenv(MIRRORS_ENV, f"{server}/good/")
    x, _ = load_mnist("train", n=1500)
    assert x.shape == (1500, 1, 28, 28) and not hits
