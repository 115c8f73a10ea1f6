"""Stage 1: Dolly (or the offline sample, or a local file) → cleaned, split Parquet."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from gemma_core.config import SAMPLE_SOURCE, DataConfig
from gemma_core.dolly_prepare import format_dolly_to_parquet
from tasks.common import CACHED, transient_error
from gemma_core.manifest import sha256_file
from tasks.results import DataResult, FileRef
from tasks.runtime import logger, maybe_fail, peak_rss_mb, timed
from tasks.stages import PREPARE_DATA


def source_fingerprint(source: str | DataConfig) -> str:
    """What identifies the source's content for the cache key, without parsing it.

    A local file counts by its sha256; the offline sample is part of the package sources, which
    every key already includes; an ``hf://`` dataset counts by its name (the Hub copy is cached
    by ``datasets``). Given the whole data config, the ``data.eval_source`` file counts the same way.
    """
    if isinstance(source, DataConfig):
        training = source_fingerprint(source.source)
        if source.eval_source is None:
            return training
        return f"{training} eval:{source_fingerprint(source.eval_source)}"
    if source == SAMPLE_SOURCE or source.startswith("hf://"):
        return source
    path = Path(source).expanduser()
    if path.is_file():
        return f"sha256:{sha256_file(path)}"
    return f"missing:{source}"  # the task reports the error with the fix


@task(name=PREPARE_DATA, retries=2, retry_delay_seconds=10, retry_condition_fn=transient_error, **CACHED)
def prepare_data(data: DataConfig, out_root: str, source_fingerprint: str) -> DataResult:
    """Read, clean, template and split the data; the output directory is named by its content hash."""
    maybe_fail(PREPARE_DATA)
    with timed() as t:
        prepared = format_dolly_to_parquet(data, Path(out_root) / "data")
    out_dir = prepared.train_path.parent
    logger().info(
        "data: %d train / %d eval rows from %s%s, %s format, held out: %s -> %s",
        prepared.counts["train"], prepared.counts["eval"], prepared.source,
        " (offline sample, not Dolly-15k)" if prepared.is_sample else "", prepared.prompt_format,
        prepared.eval_source or f"data.eval_fraction={data.eval_fraction}", out_dir,
    )
    dropped = {k: v for k, v in prepared.dropped.items() if v}
    if dropped:
        logger().info("data: dropped rows by reason: %s", dropped)
    return DataResult(
        stage=PREPARE_DATA,
        fingerprint=prepared.content_hash,
        files={
            "train": FileRef.of(prepared.train_path),
            "eval": FileRef.of(prepared.eval_path),
            "manifest": FileRef.of(out_dir / "manifest.json"),
        },
        seconds=t.seconds,
        peak_rss_mb=peak_rss_mb(),
        data_hash=prepared.content_hash,
        source=prepared.source,
        is_sample=prepared.is_sample,
        counts=prepared.counts,
        dropped=prepared.dropped,
        prompt_format=prepared.prompt_format,
        eval_source=prepared.eval_source,
    )
