"""Download the four MNIST files into a cache: mirrors in turn, retries with backoff, MD5 and SHA-256
checks, atomic writes (a temporary file in the cache directory, then ``os.replace``)."""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .fileio import fsync_dir
from .idx import MNISTDataError

__all__ = ["MIRRORS", "MIRRORS_ENV", "MNIST_FILES", "RemoteFile", "download_file", "mirrors_from_env"]

#: The mirrors torchvision uses, tried in this order.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
#: Environment variable overriding :data:`MIRRORS`: base URLs separated by spaces or commas.
MIRRORS_ENV = "ODEFLUX_MNIST_MIRRORS"


@dataclass(frozen=True)
class RemoteFile:
    """A file to fetch: its name under each mirror's base URL, and what it must be."""

    name: str
    size: int
    md5: str
    sha256: str


MNIST_FILES: dict[str, RemoteFile] = {
    f.name: f
    for f in (
        RemoteFile("train-images-idx3-ubyte.gz", 9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                   "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        RemoteFile("train-labels-idx1-ubyte.gz", 28881, "d53e105ee54ea40749a09fcbcd1e9432",
                   "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        RemoteFile("t10k-images-idx3-ubyte.gz", 1648877, "9fb629c4189551a2d022fa330f9573f3",
                   "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        RemoteFile("t10k-labels-idx1-ubyte.gz", 4542, "ec29112dd5afa0611ce80d1b7f02629c",
                   "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    )
}

_CHUNK = 1 << 16
_STALE_PART_S = 600.0  # a live download rewrites its .part file far more often than this


class _Transient(Exception):
    """Worth retrying on the same mirror (timeout, dropped connection, truncated body, 5xx)."""


class _Permanent(Exception):
    """Not worth retrying on this mirror (404, wrong checksum, bad URL)."""


def mirrors_from_env() -> tuple[str, ...]:
    """The mirror base URLs: ``$ODEFLUX_MNIST_MIRRORS`` if set, else :data:`MIRRORS`."""
    value = os.environ.get(MIRRORS_ENV, "").replace(",", " ").split()
    return tuple(value) if value else MIRRORS


def download_file(
    remote: RemoteFile,
    dest_dir: str | os.PathLike,
    *,
    mirrors: Sequence[str] | None = None,
    timeout: float = 10.0,
    retries: int = 3,
    backoff: float = 0.5,
    quiet: bool = False,
) -> Path:
    """Fetch ``remote`` into ``dest_dir`` and return its path; a file already there is kept.

    Tries each mirror in turn (default :func:`mirrors_from_env`), up to ``retries`` attempts per
    mirror for transient failures, sleeping ``backoff * 2**k`` between them; a 4xx answer or a
    checksum mismatch moves on to the next mirror at once. ``timeout`` bounds each socket
    operation. The file appears under its final name only once its size, MD5 and SHA-256 match;
    nothing half-written is left behind. Raises :class:`MNISTDataError` listing every failure.
    """
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")
    dest_dir = Path(dest_dir)
    final = dest_dir / remote.name
    if final.exists():
        return final
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MNISTDataError(f"cannot create the cache directory {dest_dir} ({exc.strerror or exc}); "
                             "set XDG_CACHE_HOME to a writable directory or pass --data-dir") from None
    _remove_stale_parts(dest_dir, remote.name)
    mirrors = tuple(mirrors) if mirrors is not None else mirrors_from_env()
    failures: list[str] = []
    for base in mirrors:
        url = base if base.endswith(remote.name) else base.rstrip("/") + "/" + remote.name
        for attempt in range(retries):
            if not quiet:
                print(f"odeflux: downloading {url} -> {dest_dir}", file=sys.stderr)
            try:
                _fetch(url, remote, final, timeout)
                return final
            except _Permanent as exc:
                failures.append(f"{url}: {exc}")
                break
            except _Transient as exc:
                failures.append(f"{url} (attempt {attempt + 1}/{retries}): {exc}")
                if attempt + 1 < retries and backoff > 0:
                    time.sleep(backoff * 2**attempt)
    raise MNISTDataError(
        f"could not download {remote.name}: " + "; ".join(failures or ["no mirrors given"])
        + f"; check the network or {MIRRORS_ENV}, or pass --data-dir (or set ODEFLUX_DATA_DIR) "
        "to a directory holding the MNIST files"
    )


def _fetch(url: str, remote: RemoteFile, final: Path, timeout: float) -> None:
    """One attempt: stream ``url`` to a temporary file beside ``final``, verify, then rename."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{remote.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            size = 0
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    while chunk := resp.read(_CHUNK):
                        size += len(chunk)
                        if size > remote.size:  # a wrong file; don't let it fill the disk
                            raise _Permanent(f"larger than the expected {remote.size} bytes")
                        md5.update(chunk)
                        sha256.update(chunk)
                        out.write(chunk)
            except urllib.error.HTTPError as exc:
                kind = _Transient if exc.code >= 500 or exc.code in (408, 429) else _Permanent
                raise kind(f"HTTP {exc.code} {exc.reason}") from None
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, str) and exc.reason.startswith("unknown url type"):
                    raise _Permanent(str(exc.reason)) from None
                raise _Transient(f"cannot connect ({exc.reason})") from None
            except http.client.IncompleteRead as exc:
                raise _Transient(f"truncated: got {size + len(exc.partial)} of {remote.size} bytes") from None
            except (http.client.HTTPException, OSError) as exc:  # timeouts, resets, bad status lines
                raise _Transient(f"{type(exc).__name__}: {str(exc) or 'connection failed'}") from None
            except ValueError as exc:  # malformed URL
                raise _Permanent(str(exc)) from None
            if size != remote.size:
                raise _Transient(f"truncated: got {size} of {remote.size} bytes")
            if md5.hexdigest() != remote.md5:
                raise _Permanent(f"checksum mismatch: expected MD5 {remote.md5}, found {md5.hexdigest()}")
            if sha256.hexdigest() != remote.sha256:
                raise _Permanent(f"checksum mismatch: expected SHA-256 {remote.sha256}, found {sha256.hexdigest()}")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def _remove_stale_parts(dest_dir: Path, name: str) -> None:
    """Remove temporary files that a killed download of ``name`` left behind."""
    now = time.time()
    for part in dest_dir.glob(f".{name}.*.part"):
        try:
            if now - part.stat().st_mtime > _STALE_PART_S:
                part.unlink()
        except OSError:
            pass  # another process's file, or already gone


