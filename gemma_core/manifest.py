"""A directory of files with their sizes and sha256s, written atomically, verified on read.

One format for everything the project writes as a unit and must be able to trust later: the data
stage's Parquet splits, each training checkpoint, the converted model preset. The manifest is a
JSON object ``{"files": {name: {"size": ..., "sha256": ...}}, **info}`` in the directory itself;
stage results (``tasks/results.py``) check single files with :func:`file_problem`, the same check.

>>> write_manifest(out_dir, {"step": 12}, files=["adapter.lora.h5"])      # doctest: +SKIP
>>> read_verified(out_dir, required=["adapter.lora.h5"])["step"]           # doctest: +SKIP
12
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from gemma_core.atomic import atomic_write_text
from gemma_core.redact import redact

MANIFEST_FILE = "manifest.json"

# (path, size, mtime_ns, ctime_ns, inode) -> sha256: a file hashed once in this process is not reread
# while it is unchanged (the model preset is about 1 GB). ctime moves on every write and every utime,
# so an edit in place is never served from here.
_MEMO: dict[tuple[str, int, int, int, int], str] = {}


class ManifestError(ValueError):
    """A directory does not match its manifest; ``problems`` name each file and what is wrong."""

    def __init__(self, directory: str | os.PathLike, problems: list[str]):
        self.directory, self.problems = Path(directory), problems
        super().__init__(f"{directory}: {'; '.join(problems)}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks, remembered while the file is unchanged."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    digest = _MEMO.get(key)
    if digest is None:
        hasher = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                hasher.update(chunk)
        digest = _MEMO[key] = hasher.hexdigest()
    return digest


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def file_problem(
    path: str | os.PathLike, sha256: str, size: int | None = None, label: str | None = None
) -> str | None:
    """None when ``path`` exists with this sha256 (and size), else what is wrong, naming the file
    (as ``label``, default its path)."""
    path = Path(path)
    label = label or str(path)
    if not path.is_file():
        return f"{label}: missing"
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"{label}: {actual} bytes, manifest says {size} (partial write?)"
    if sha256_file(path) != sha256:
        return f"{label}: sha256 differs from the recorded one (corrupted)"
    return None


def write_manifest(
    directory: str | os.PathLike, info: dict[str, Any] | None = None, files: Iterable[str] | None = None,
    name: str = MANIFEST_FILE,
) -> dict[str, Any]:
    """Record ``info`` and the size and sha256 of ``files`` (default: every file below ``directory``
    but the manifest and lock files) in ``directory/name``; returns the manifest. Credentials inside
    URLs in ``info`` (a data source, a model spec) are redacted (:mod:`gemma_core.redact`)."""
    directory = Path(directory)
    if files is None:
        files = [str(p.relative_to(directory)) for p in sorted(directory.rglob("*"))
                 if p.is_file() and p.name != name and not p.name.endswith(".lock")]
    manifest = {**redact(info or {}), "files": {f: file_entry(directory / f) for f in sorted(files)}}
    atomic_write_text(directory / name, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_manifest(directory: str | os.PathLike, name: str = MANIFEST_FILE) -> dict[str, Any] | None:
    """The manifest as written, unchecked; None when it is missing or not a JSON object."""
    try:
        loaded = json.loads((Path(directory) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def manifest_problems(
    directory: str | os.PathLike, name: str = MANIFEST_FILE, required: Iterable[str] = ()
) -> list[str]:
    """What is wrong with ``directory`` against its manifest: empty when every listed file is intact.

    ``required`` names files the manifest must list: a manifest damaged into valid JSON must not
    vouch for files it does not mention.
    """
    directory = Path(directory)
    manifest = read_manifest(directory, name)
    files = manifest.get("files") if manifest else None
    if not isinstance(files, dict) or not files:
        return [f"{name}: missing or unreadable (an interrupted or foreign write)"]
    problems = [f"{name}: records no sha256 for {f}" for f in sorted(set(required) - set(files))]
    for file, entry in files.items():
        if not isinstance(entry, dict) or not {"size", "sha256"} <= entry.keys():
            problems.append(f"{file}: the manifest's entry is damaged ({entry!r:.60})")
            continue
        problem = file_problem(directory / file, entry["sha256"], entry["size"], label=file)
        if problem:
            problems.append(problem)
    return problems


def read_verified(
    directory: str | os.PathLike, name: str = MANIFEST_FILE, required: Iterable[str] = ()
) -> dict[str, Any]:
    """The manifest of ``directory`` once every file it lists is checked; ManifestError otherwise."""
    problems = manifest_problems(directory, name, required)
    if problems:
        raise ManifestError(directory, problems)
    return read_manifest(directory, name)  # type: ignore[return-value]
