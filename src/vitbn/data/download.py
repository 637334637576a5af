"""Local files with known MD5s: verify them, and download missing ones from mirrors, atomically.

A file is only ever used after its MD5 matched. A download streams into a temporary file in the destination
folder, hashing as it goes, and is renamed into place (``os.replace``) only when the digest is right; otherwise the
temporary file is deleted and the next mirror is tried. A local file with a wrong digest is reported, never
overwritten or used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vitbn.errors import UserError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
TIMEOUT_S = 30.0

# (resolved path, size, mtime_ns) -> MD5 hex digest: a file is hashed once per process unless it changes.
_MD5_CACHE: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class RemoteFile:
    """A file of a dataset: its name (in the dataset folder and on every mirror) and its MD5 hex digest."""

    name: str
    md5: str


def md5sum(path: str | Path) -> str:
    """The MD5 hex digest of a file, cached per process by (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _MD5_CACHE:
        digest = hashlib.md5(usedforsecurity=False)
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        _MD5_CACHE[key] = digest.hexdigest()
    return _MD5_CACHE[key]


def verify_md5(path: Path, expected: str) -> None:
    """Raises a one-line UserError naming the file and both digests if the file's MD5 is not ``expected``."""
    actual = md5sum(path)
    if actual != expected.lower():
        raise UserError(
            f"MD5 mismatch for {path}: expected {expected.lower()}, got {actual} "
            "(corrupt or not the official file; delete it to download it again)"
        )


def _download_one(url: str, dest: Path, md5: str) -> None:
    """Streams ``url`` into a temporary file beside ``dest``; renames it to ``dest`` only if its MD5 matches."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5.lower():
            raise UserError(f"MD5 mismatch for {dest}: expected {md5.lower()}, got {digest.hexdigest()} (deleted)")
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)  # after os.replace there is nothing left to remove


def _fetch(file: RemoteFile, folder: Path, mirrors: Sequence[str], dead: dict[str, str]) -> list[str]:
    """Tries the mirrors in turn; returns the reasons each one failed (empty once the file is in place).

    ``dead`` maps mirrors that failed at the network level to the reason; they are skipped for later files so an
    offline machine fails fast instead of waiting for every file's timeouts.
    """
    if not mirrors:
        return ["no download mirror is known"]
    errors = []
    for mirror in mirrors:
        if mirror in dead:
            errors.append(f"{mirror}: {dead[mirror]}")
            continue
        url = f"{mirror.rstrip('/')}/{file.name}"
        log.info("downloading %s", url)
        try:
            _download_one(url, folder / file.name, file.md5)
            return []
        except UserError as exc:
            errors.append(f"{url}: {exc}")
        except urllib.error.HTTPError as exc:
            errors.append(f"{mirror}: HTTP {exc.code} {exc.reason} for {file.name}")
        except urllib.error.URLError as exc:
            dead[mirror] = str(exc.reason)
            errors.append(f"{mirror}: {exc.reason}")
        except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
            dead[mirror] = str(exc)
            errors.append(f"{mirror}: {exc}")
    return errors


def _topmost_missing(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist yet (None if ``folder`` exists)."""
    if folder.exists():
        return None
    while not folder.parent.exists():
        folder = folder.parent
    return folder


def _remove_empty(folder: Path, top: Path) -> None:
    """Removes ``folder`` and its parents up to ``top`` while they are empty (rmdir refuses non-empty ones)."""
    for path in (folder, *folder.parents):
        try:
            path.rmdir()
        except OSError:
            return
        if path == top:
            return


def _where_to_put(names: Sequence[str], folder: Path, mirrors: Sequence[str]) -> str:
    return (
        f"put {', '.join(names)} in {folder}/ (download them from {' or '.join(mirrors) or 'the official site'}) "
        "or set VITBN_DATA / the root to a folder that has them"
    )


def ensure_files(
    files: Sequence[RemoteFile], folder: str | Path, mirrors: Sequence[str], *, download: bool = True
) -> dict[str, Path]:
    """Makes sure every file is in ``folder`` with its MD5, downloading the missing ones.

    Args:
        files: The files the dataset needs.
        folder: Where they live (created if a download is needed).
        mirrors: Base URLs tried in order; a file's URL is ``<mirror>/<name>``.
        download: If False, missing files are an error instead of being downloaded.

    Returns:
        The verified path of each file, by name.

    Raises:
        UserError: A local file fails its MD5 (the message names it and both digests), or missing files could not
            be downloaded (the message lists them, each mirror's failure, and where to put them).
    """
    folder = Path(folder).expanduser()
    paths = {f.name: folder / f.name for f in files}
    missing = [f for f in files if not paths[f.name].is_file()]
    for f in files:
        if f not in missing:
            verify_md5(paths[f.name], f.md5)
    if not missing:
        return paths
    names = [f.name for f in missing]
    if not download:
        raise UserError(f"missing data file(s) and download=False: {_where_to_put(names, folder, mirrors)}")
    created = _topmost_missing(folder)  # removed again if nothing arrives
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        where = _where_to_put(names, folder, mirrors)
        raise UserError(f"cannot create {folder} ({exc.strerror or exc}): {where}") from None
    dead: dict[str, str] = {}
    failures = {f.name: _fetch(f, folder, mirrors, dead) for f in missing}
    failures = {name: errors for name, errors in failures.items() if errors}
    if failures:
        if created is not None:
            _remove_empty(folder, created)
        reasons = "; ".join(dict.fromkeys(e for errors in failures.values() for e in errors))  # distinct, in order
        where = _where_to_put(list(failures), folder, mirrors)
        raise UserError(f"could not download {', '.join(failures)} ({reasons}); {where}")
    return paths
