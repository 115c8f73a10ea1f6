"""The data stage: Dolly-shaped records → cleaned, templated, split Parquet files.

>>> from gemma_core.config import DataConfig
>>> prepared = format_dolly_to_parquet(DataConfig(source="sample"), "runs/data")   # doctest: +SKIP
>>> prepared.train_path, prepared.counts["train"]                                  # doctest: +SKIP

Outputs live in a directory named by a hash of the source bytes (and the ``data.eval_source``
file's, when one is given), the data config and this code's version, so a changed input can never be
answered with a stale file of the same name.

Each row carries its ``prompt`` and its ``completion`` (the training target after the prompt) in
the config's prompt format (:mod:`gemma_core.prompts`); the manifest records the format, so a
model trained on these rows can be checked against the format it is later asked in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gemma_core import __version__
from gemma_core.atomic import atomic_directory
from gemma_core.manifest import ManifestError, read_verified, sha256_bytes, write_manifest
from gemma_core.config import EMBEDDED_MODEL, DataConfig
from gemma_core.dolly_sources import DOLLY_COLUMNS, DollySource, read_dolly_source
from gemma_core.prompts import default_prompt_format, format_prompt, format_response, strip_citations

log = logging.getLogger(__name__)

METADATA_KEY = b"gemma_lora_flow"
# Bump when the cleaning, template or split changes: it is part of every output's hash.
FORMAT_VERSION = "2"
DROP_REASONS = ("missing_instruction", "missing_response", "non_string_field", "duplicate")
# With data.eval_source: training rows whose instruction and context are also held-out prompts.
HELD_OUT_OVERLAP = "also_in_eval_source"
OUTPUT_COLUMNS = (*DOLLY_COLUMNS, "prompt", "completion")
SPLIT_FILES = ("train.parquet", "eval.parquet")


@dataclass(frozen=True)
class PreparedData:
    """What the data stage hands downstream: small, serialisable, content-addressed."""

    train_path: Path
    eval_path: Path
    content_hash: str
    source: str
    is_sample: bool
    counts: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    prompt_format: str = "instruction"  # the format of the ``prompt`` and ``completion`` columns
    eval_source: str | None = None  # the held-out file used as the eval split (None: a slice of ``source``)


def resolve_data_config(cfg: DataConfig, model_spec: str = EMBEDDED_MODEL) -> DataConfig:
    """``cfg`` with ``prompt_format: auto`` resolved for ``model_spec`` (a PipelineConfig has done this
    already; a DataConfig on its own means the default model unless told)."""
    if cfg.prompt_format != "auto":
        return cfg
    return cfg.model_copy(update={"prompt_format": default_prompt_format(model_spec)})


def format_dolly_to_parquet(cfg: DataConfig, out_root: str | Path, model_spec: str = EMBEDDED_MODEL) -> PreparedData:
    """Read ``cfg.source`` (and ``cfg.eval_source``), drop bad rows (counted by reason), template,
    split and write Parquet. ``model_spec`` only resolves ``prompt_format: auto``."""
    cfg = resolve_data_config(cfg, model_spec)
    raw = read_dolly_source(cfg.source)
    held_out = read_dolly_source(cfg.eval_source) if cfg.eval_source is not None else None
    content_hash = sha256_bytes(json.dumps(
        [raw.sha256, held_out.sha256 if held_out else None, cfg.model_dump(mode="json"), FORMAT_VERSION],
        sort_keys=True).encode())[:16]
    out_dir = Path(out_root) / f"data-{content_hash}"
    if out_dir.is_dir():
        try:
            return read_prepared(out_dir)
        except ManifestError as err:
            log.warning("cached data %s is unusable (%s); rebuilding it", out_dir, "; ".join(err.problems))
            _remove_tree(out_dir)

    clean, dropped = _templated_records(raw, cfg)
    eval_dropped: dict[str, int] | None = None
    if held_out is None:
        train, evaluation = stratified_split(clean, cfg.eval_fraction, cfg.seed)
    else:
        # The user's own held-out set is the eval split, whole; the training source is not cut.
        evaluation, eval_dropped = _templated_records(held_out, cfg)
        if any(eval_dropped.values()):
            log.warning("data: dropped held-out rows of %s by reason: %s", held_out.source, _describe(eval_dropped))
        # A held-out prompt that is also trained on would flatter the tuned model.
        held_out_prompts = set(zip(evaluation["instruction"], evaluation["context"]))
        overlap = np.array([k in held_out_prompts for k in zip(clean["instruction"], clean["context"])], dtype=bool)
        dropped[HELD_OUT_OVERLAP] = int(overlap.sum())
        train, _ = stratified_split(clean[~overlap], 0.0, cfg.seed)
        evaluation = _round_robin([g for _, g in sorted(evaluation.groupby("category", sort=True), key=lambda kv: kv[0])])
    if cfg.train_limit is not None:
        train = train.head(cfg.train_limit)
    if cfg.eval_limit is not None:
        evaluation = evaluation.head(cfg.eval_limit)
    if train.empty or evaluation.empty:
        if held_out is not None:
            raise ValueError(
                f"the training source {raw.source} left no training rows once the prompts of "
                f"data.eval_source={cfg.eval_source!r} were taken out: use a separate held-out file"
            )
        raise ValueError(
            f"the split of {raw.source} left an empty {'train' if train.empty else 'eval'} set "
            f"({len(clean)} usable rows, data.eval_fraction={cfg.eval_fraction}); use more rows or "
            "adjust data.eval_fraction"
        )

    metadata = _metadata(raw, held_out, cfg, content_hash, train, evaluation, dropped, eval_dropped)
    with atomic_directory(out_dir) as tmp:
        _write_parquet(train, tmp / "train.parquet", metadata)
        _write_parquet(evaluation, tmp / "eval.parquet", metadata)
        write_manifest(tmp, metadata, files=SPLIT_FILES)
    log.info(
        "data: %d train / %d eval rows from %s; dropped %s",
        len(train), len(evaluation), raw.source, _describe(dropped),
    )
    return read_prepared(out_dir)


def _templated_records(raw: DollySource, cfg: DataConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """The usable rows of one source, cleaned, with their prompt and completion in ``cfg.prompt_format``."""
    clean, dropped = clean_dolly_records(raw.frame)
    if clean.empty:
        raise ValueError(f"no usable rows in {raw.source}: all were dropped ({_describe(dropped)})")
    if cfg.strip_citations:
        clean["context"] = clean["context"].map(strip_citations)
    clean["prompt"] = [format_prompt(i, c, cfg.prompt_format) for i, c in zip(clean["instruction"], clean["context"])]
    clean["completion"] = [format_response(r, cfg.prompt_format) for r in clean["response"]]
    return clean, dropped


def clean_dolly_records(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop unusable rows and count each drop by its first failing reason.

    A missing context is an empty context (Dolly leaves most contexts empty); a missing category is
    ``"unknown"``. Every other field must be a string.
    """
    dropped = dict.fromkeys(DROP_REASONS, 0)
    frame = frame.copy()
    frame["context"] = frame["context"].map(lambda v: "" if _is_missing(v) else v)
    # isinstance first: a list-valued cell (Parquet) compared with "" would give an array, not a bool.
    frame["category"] = frame["category"].map(
        lambda v: "unknown" if _is_missing(v) or (isinstance(v, str) and v == "") else v
    )

    is_str = frame[list(DOLLY_COLUMNS)].map(lambda v: isinstance(v, str) or _is_missing(v))
    missing_instruction = frame["instruction"].map(_is_blank)
    missing_response = ~missing_instruction & frame["response"].map(_is_blank)
    non_string = ~missing_instruction & ~missing_response & ~is_str.all(axis=1)
    dropped["missing_instruction"] = int(missing_instruction.sum())
    dropped["missing_response"] = int(missing_response.sum())
    dropped["non_string_field"] = int(non_string.sum())
    kept = frame[~(missing_instruction | missing_response | non_string)]

    duplicate = kept.duplicated(subset=list(DOLLY_COLUMNS), keep="first")
    dropped["duplicate"] = int(duplicate.sum())
    return kept[~duplicate].reset_index(drop=True), dropped


def stratified_split(frame: pd.DataFrame, eval_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out ``eval_fraction`` of every category, chosen by ``seed``.

    Both splits come back interleaved across categories (round-robin), so any prefix, such as the
    first N evaluation prompts or a ``train_limit``, is balanced across categories too.
    """
    rng = np.random.default_rng(seed)
    train_parts, eval_parts = [], []
    for _, group in sorted(frame.groupby("category", sort=True), key=lambda kv: kv[0]):
        group = group.iloc[rng.permutation(len(group))]
        n_eval = int(round(len(group) * eval_fraction))
        if len(group) >= 2 and eval_fraction > 0:
            n_eval = min(max(n_eval, 1), len(group) - 1)
        eval_parts.append(group.iloc[:n_eval])
        train_parts.append(group.iloc[n_eval:])
    return _round_robin(train_parts), _round_robin(eval_parts)


def read_prepared(out_dir: str | Path) -> PreparedData:
    """Load a data stage's output directory once its files match their manifest (else ManifestError)."""
    out_dir = Path(out_dir)
    manifest = read_verified(out_dir, required=SPLIT_FILES)
    try:
        return PreparedData(
            train_path=out_dir / "train.parquet",
            eval_path=out_dir / "eval.parquet",
            content_hash=manifest["content_hash"],
            source=manifest["source"],
            is_sample=manifest["is_sample"],
            counts=manifest["counts"],
            dropped=manifest["dropped"],
            # Written before prompt formats existed: the instruction template was the only one.
            prompt_format=manifest.get("prompt_format", "instruction"),
            eval_source=manifest.get("eval_source", {}).get("source") if manifest.get("eval_source") else None,
        )
    except KeyError as err:
        raise ManifestError(out_dir, [f"manifest.json is not a data manifest (no {err})"]) from None


def read_split(path: str | Path) -> pd.DataFrame:
    return pq.read_table(path).to_pandas()


def _round_robin(parts: list[pd.DataFrame]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame(columns=list(OUTPUT_COLUMNS))
    ranked = [p.assign(_rank=np.arange(len(p)), _cat=i) for i, p in enumerate(parts)]
    merged = pd.concat(ranked).sort_values(["_rank", "_cat"], kind="stable")
    return merged.drop(columns=["_rank", "_cat"]).reset_index(drop=True)


def _metadata(
    raw: DollySource, held_out: DollySource | None, cfg: DataConfig, content_hash: str,
    train: pd.DataFrame, evaluation: pd.DataFrame, dropped: dict[str, int], eval_dropped: dict[str, int] | None,
) -> dict[str, Any]:
    return {
        "source": raw.source,
        "source_sha256": raw.sha256,
        "is_sample": raw.is_sample,
        "license": raw.license,
        "prompt_format": cfg.prompt_format,
        # Where the eval split came from: the user's own held-out set, or a slice of the source.
        "eval_split": f"data.eval_source ({held_out.source})" if held_out else
                      f"data.eval_fraction={cfg.eval_fraction} of data.source, per category",
        "eval_source": None if held_out is None else
                       {"source": held_out.source, "sha256": held_out.sha256, "license": held_out.license,
                        "dropped": eval_dropped},
        "content_hash": content_hash,
        "config_hash": sha256_bytes(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())[:16],
        "format_version": FORMAT_VERSION,
        "gemma_core_version": __version__,
        "counts": {"train": len(train), "eval": len(evaluation)},
        "per_category": {
            "train": {k: int(v) for k, v in train["category"].value_counts().sort_index().items()},
            "eval": {k: int(v) for k, v in evaluation["category"].value_counts().sort_index().items()},
        },
        "dropped": dropped,
    }


def _write_parquet(frame: pd.DataFrame, path: Path, metadata: dict[str, Any]) -> None:
    table = pa.Table.from_pandas(frame[list(OUTPUT_COLUMNS)].astype(str), preserve_index=False)
    schema_meta = {**(table.schema.metadata or {}), METADATA_KEY: json.dumps(metadata).encode()}
    pq.write_table(table.replace_schema_metadata(schema_meta), path)


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _is_blank(value: Any) -> bool:
    return _is_missing(value) or (isinstance(value, str) and not value.strip())


def _describe(dropped: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in dropped.items() if v) or "none"


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
