"""Where a run reads and writes: local paths and storage URLs (gs://, s3://, az://) behind one type.

Every run file (checkpoints, metrics.jsonl, rollouts, TensorBoard, the config and tokenizer snapshot,
exports) goes through `etils.epath.Path`, the path type orbax already uses: gs:// is served by gcsfs
(fsspec), and orbax's arrays by tensorstore's own GCS driver. Libraries that only write local files
(tokenizers' save_pretrained, safetensors, the TensorBoard event writer) write to a local staging
folder that `upload_tree` copies to the URL.

Emulators: gcsfs / google-cloud-storage read STORAGE_EMULATOR_HOST; tensorstore reads
TENSORSTORE_GCS_HTTP_URL (and GOOGLE_AUTH_TOKEN_FOR_TESTING for a fake token).
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import tempfile
import threading
import urllib.parse
from typing import Any

from etils import epath

URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
SCHEMES: tuple[str, ...] = ("gs", "s3", "az")
PROBE_TIMEOUT_S = 60.0
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


class StorageError(ValueError):
    """A storage URL that is malformed or cannot be reached; the message names the URL and the key."""


def is_url(path: str | os.PathLike) -> bool:
    return bool(URL_PATTERN.match(os.fspath(path)))


def resolve_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> epath.Path:
    """A storage URL as is; a local path with ~ and $VARS expanded, relative ones taken from `base`
    (default: the repository root)."""
    text = os.fspath(path)
    if is_url(text):
        return epath.Path(text)
    p = pathlib.Path(os.path.expandvars(os.path.expanduser(text)))
    return epath.Path(p if p.is_absolute() else pathlib.Path(base or REPO_ROOT) / p)


def check_url(path: str | os.PathLike, key: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """For a URL: a known scheme, a bucket, and a bucket that answers within `timeout_s`. Local paths pass."""
    text = os.fspath(path)
    if not is_url(text):
        return
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in SCHEMES:
        raise StorageError(f"{key}: {text!r} has an unsupported scheme {parts.scheme}://; use a local path or one of "
                           f"{', '.join(s + '://' for s in SCHEMES)}")
    if not parts.netloc or not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", parts.netloc):
        raise StorageError(f"{key}: {text!r} has no valid bucket name (expected {parts.scheme}://BUCKET/PATH)")
    backend = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}[parts.scheme]
    if importlib.util.find_spec(backend) is None:
        raise StorageError(f"{key}: {text!r} needs the {backend} package (pip install {backend}; for gs:// the "
                           f"ruscarl_jax[gcs] extra)")
    bucket = epath.Path(f"{parts.scheme}://{parts.netloc}")
    answer: list[Any] = []

    def probe() -> None:
        try:
            answer.append(bucket.exists())
        except Exception as err:  # the fsspec backends raise many types (auth, connection, HTTP)
            answer.append(err)

    thread = threading.Thread(target=probe, daemon=True)  # daemon: a hung probe does not hold the exit
    thread.start()
    thread.join(timeout_s)
    if not answer:
        raise StorageError(f"{key}: cannot reach {bucket} for {text!r} (no answer in {timeout_s:.0f} s)")
    exists = answer[0]
    if isinstance(exists, Exception):
        raise StorageError(f"{key}: cannot reach {bucket} for {text!r}: {type(exists).__name__}: {exists}")
    if not exists:
        raise StorageError(f"{key}: bucket {bucket} of {text!r} does not exist or is not readable")


def upload_tree(local: str | os.PathLike, target: epath.Path) -> None:
    """Copy every file under the local folder `local` to `target` (a local path or URL), replacing."""
    local = pathlib.Path(local)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        dest = target / file.relative_to(local).as_posix()
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(file.read_bytes())


def download_tree(source: epath.Path, local: str | os.PathLike) -> pathlib.Path:
    """Copy the files directly under `source` (one level, as a tokenizer folder has) into `local`."""
    local = pathlib.Path(local)
    local.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file():
            (local / file.name).write_bytes(file.read_bytes())
    return local


def write_atomic(path: epath.Path, text: str) -> None:
    """Replace a file's content whole: a local file via a temporary file and rename (a kill mid-write
    leaves the old content); an object store replaces objects whole anyway."""
    if is_url(os.fspath(path)):
        path.write_text(text, encoding="utf-8")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.fspath(path.parent), prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, os.fspath(path))

