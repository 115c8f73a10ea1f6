"""Adapter-only, mid-epoch checkpoints: LoRA weights, optimizer state, step, with checksums.

Each checkpoint is a directory ``step-00000012/`` published by one atomic rename, holding
``adapter.lora.h5`` (keras-hub's ``save_lora_weights``), ``optimizer.npz`` and ``manifest.json``
(step, identity of the run, size and sha256 of both files; :mod:`gemma_core.manifest`). A
checkpoint whose files do not match their manifest is skipped for the previous one, and the log
says which file and why.

The final adapter gets a manifest beside it too (``adapter.manifest.json`` for ``adapter.lora.h5``:
the run identity, including the prompt format it was trained in), so whoever loads the adapter
later can refuse to ask it in another format (:func:`adapter_prompt_format`).

Shuffling is a pure function of (seed, epoch) and the data position a pure function of the step,
so the step number is the whole "data position and RNG state" needed to resume exactly.
"""

from __future__ import annotations

import errno
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gemma_core.atomic import DiskFullError, atomic_directory
from gemma_core.manifest import MANIFEST_FILE, ManifestError, read_verified, write_manifest
from gemma_core.prompts import PromptFormatMismatchError

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.lora.h5"
OPTIMIZER_FILE = "optimizer.npz"
CHECKPOINT_FILES = (ADAPTER_FILE, OPTIMIZER_FILE)
# Fields of the run identity that must match for a checkpoint to be resumed, with the fix to name.
IDENTITY_FIXES = {
    "model_id": "train from the same model.spec, or use a fresh output directory",
    "prompt_format": "set data.prompt_format back (--set data.prompt_format=...), or use a fresh output directory",
    "lora_rank": "set lora.rank back, or use a fresh output directory",
    "lora_targets": "set lora.target_layer_names back, or use a fresh output directory",
    "trainable_tokens": "set lora.trainable_tokens back, or use a fresh output directory",
    "data_hash": "train on the same data, or use a fresh output directory",
    "batch_size": "set train.batch_size back, or use a fresh output directory",
    "sequence_length": "set train.sequence_length back, or use a fresh output directory",
    "seed": "set train.seed back, or use a fresh output directory",
}


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another model, rank or data: resuming from it would be wrong."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    manifest: dict[str, Any]

    @property
    def adapter_path(self) -> Path:
        return self.path / ADAPTER_FILE


def save_checkpoint(
    ckpt_root: Path, step: int, backbone, optimizer, identity: dict[str, Any], losses: list[float], keep: int
) -> Checkpoint:
    target = ckpt_root / f"step-{step:08d}"
    _check_room(target, backbone, optimizer)
    with atomic_directory(target) as tmp:
        from gemma_core.token_rows import save_adapter

        save_adapter(backbone, tmp / ADAPTER_FILE)
        values = {f"v{i:04d}": np.asarray(v) for i, v in enumerate(optimizer.variables)}
        with open(tmp / OPTIMIZER_FILE, "wb") as f:
            np.savez(f, **values)
        manifest = write_manifest(tmp, {
            "step": step,
            "identity": identity,
            "losses": losses,
            "optimizer_variables": [v.path for v in optimizer.variables],
        }, files=CHECKPOINT_FILES)
    _prune(ckpt_root, keep)
    return Checkpoint(target, step, manifest)


def _check_room(target: Path, backbone, optimizer) -> None:
    """Refuse to start a checkpoint that cannot fit. HDF5 (Keras' weight files) copes badly with a disk
    that fills in the middle of a file: the write fails, and the process can later crash (a segfault
    when h5py closes the half-written file); checking first turns the common case into a clear error."""
    variables = [*optimizer.variables, *backbone.trainable_weights]
    needed = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables) + (256 << 10)
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < needed:
        raise DiskFullError(
            errno.ENOSPC,
            f"not enough space to write checkpoint {target}: it needs about {needed >> 10} KiB, "
            f"{free >> 10} KiB are free; the previous checkpoints are untouched: free some space and rerun",
            str(target),
        )


def latest_valid_checkpoint(ckpt_root: Path, identity: dict[str, Any]) -> Checkpoint | None:
    """The newest checkpoint whose files match their manifest; mismatched identity is an error."""
    for path in sorted(ckpt_root.glob("step-*"), reverse=True):
        try:
            manifest = read_verified(path, required=CHECKPOINT_FILES)
        except ManifestError as err:
            log.warning("skipping checkpoint %s: %s; trying the previous one", path, "; ".join(err.problems))
            continue
        if not (isinstance(manifest.get("step"), int) and isinstance(manifest.get("identity"), dict)
                and isinstance(manifest.get("losses"), list)):
            log.warning("skipping checkpoint %s: %s is damaged (no valid step, identity or losses); "
                        "trying the previous one", path, MANIFEST_FILE)
            continue
        _check_identity(path, manifest["identity"], identity)
        return Checkpoint(path, manifest["step"], manifest)
    return None


def restore_optimizer(optimizer, checkpoint: Checkpoint) -> None:
    with np.load(checkpoint.path / OPTIMIZER_FILE) as saved:
        values = [saved[k] for k in sorted(saved.files)]
    if len(values) != len(optimizer.variables):
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint.path} holds {len(values)} optimizer variables, the model needs "
            f"{len(optimizer.variables)}; it was written for another LoRA setup: use a fresh output directory"
        )
    for variable, value in zip(optimizer.variables, values):
        variable.assign(value)


def _check_identity(path: Path, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    for key, fix in IDENTITY_FIXES.items():
        if key == "prompt_format" and saved.get(key) != wanted.get(key):
            raise PromptFormatMismatchError(
                f"checkpoint {path} was trained in the {saved.get(key)!r} prompt format but this run uses "
                f"{wanted.get(key)!r}: use --set data.prompt_format={saved.get(key)} to resume it, or a fresh "
                "output directory to train in the new format")
        if saved.get(key) != wanted.get(key):
            raise CheckpointMismatchError(
                f"checkpoint {path} was written with {key}={saved.get(key)!r} but this run has "
                f"{key}={wanted.get(key)!r}: {fix}"
            )


def _prune(ckpt_root: Path, keep: int) -> None:
    for old in sorted(ckpt_root.glob("step-*"), reverse=True)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def adapter_manifest_name(adapter_path: str | Path) -> str:
    """``adapter.lora.h5`` -> ``adapter.manifest.json``: the manifest that describes that adapter."""
    return Path(adapter_path).name.removesuffix(".lora.h5") + ".manifest.json"


def write_adapter_manifest(adapter_path: str | Path, identity: dict[str, Any], **info: Any) -> dict[str, Any]:
    """Record what ``adapter_path`` was trained on (model, data, prompt format, LoRA settings) beside it."""
    adapter_path = Path(adapter_path)
    return write_manifest(adapter_path.parent, {"identity": identity, **info}, files=[adapter_path.name],
                          name=adapter_manifest_name(adapter_path))


def adapter_identity(adapter_path: str | Path) -> dict[str, Any] | None:
    """What ``adapter_path`` was trained on (model_id, data_hash, prompt_format, lora_rank, ...), from the
    manifest beside it; None when no manifest vouches for it (an adapter copied alone, or a changed one)."""
    adapter_path = Path(adapter_path)
    try:
        manifest = read_verified(adapter_path.parent, adapter_manifest_name(adapter_path), required=[adapter_path.name])
    except ManifestError:
        return None
    identity = manifest.get("identity")
    return identity if isinstance(identity, dict) else None


def adapter_prompt_format(adapter_path: str | Path) -> str | None:
    """The prompt format ``adapter_path`` was trained in, from its manifest; None when no manifest
    vouches for it (an adapter copied alone, or one from before prompt formats were recorded)."""
    return (adapter_identity(adapter_path) or {}).get("prompt_format")
