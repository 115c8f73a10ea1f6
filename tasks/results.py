"""What tasks hand each other: paths plus content hashes, never models, tensors or data frames.

Every result records the sha256 of the files it points to. ``verify()`` re-checks them, and the
cache policy calls it before trusting a cached result; ``cache_identity()`` is what a downstream
task's cache key sees (the content, not timings or absolute paths).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from gemma_core.manifest import file_problem, sha256_file


class FileRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    sha256: str

    @classmethod
    def of(cls, path: str | os.PathLike) -> "FileRef":
        return cls(path=str(Path(path).resolve()), sha256=sha256_file(path))

    def problem(self) -> str | None:
        return file_problem(self.path, self.sha256)


class AdapterRef(BaseModel):
    """A trained LoRA adapter: its file, and the LoRA config it is loaded with (rank, target layers).
    What evaluation and export need of a training run, or of the champion (a copy in the registry)."""

    model_config = ConfigDict(frozen=True)

    file: FileRef
    lora: dict[str, Any]
    # data.prompt_format it was trained in; None: unknown (an adapter from before prompt formats
    # existed, when the instruction template was the only one)
    prompt_format: str | None = None

    def cache_identity(self) -> dict[str, Any]:
        return {"adapter": self.file.sha256, "lora": self.lora}

    @property
    def path(self) -> Path:
        return Path(self.file.path)


class StageResult(BaseModel):
    """Base of every stage's result: the files it produced, how long it took, peak memory so far."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    stage: str
    fingerprint: str  # hash of the stage's inputs and code; names its output directory
    files: dict[str, FileRef]
    seconds: float
    peak_rss_mb: float

    @property
    def content_hash(self) -> str:
        listing = {name: ref.sha256 for name, ref in sorted(self.files.items())}
        return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]

    def cache_identity(self) -> dict[str, Any]:
        return {"stage": self.stage, "content": self.content_hash}

    def verify(self) -> str | None:
        """None when every file exists and matches its sha256, else what is wrong."""
        for ref in self.files.values():
            problem = ref.problem()
            if problem:
                return problem
        return None

    def path(self, name: str) -> Path:
        return Path(self.files[name].path)


class DataResult(StageResult):
    data_hash: str  # the data stage's own content hash (source bytes + data config + format version)
    source: str
    is_sample: bool
    counts: dict[str, int]
    dropped: dict[str, int]
    prompt_format: str = "instruction"  # of the prompt/completion columns (data.prompt_format, resolved)
    eval_source: str | None = None  # the held-out file used as the eval split (None: data.eval_fraction)

    def cache_identity(self) -> dict[str, Any]:
        return {"stage": self.stage, "content": self.content_hash, "data_hash": self.data_hash}


class ModelResult(StageResult):
    spec: str
    preset_dir: str  # what to load: a local preset directory (every file of it is in ``files``) or the spec
    model_hash: str  # content hash of the preset (what the training identity and the report name)
    cache_dir: str | None = None

    def cache_identity(self) -> dict[str, Any]:
        return {"stage": self.stage, "model_hash": self.model_hash}


class EvalResult(StageResult):
    adapter_sha256: str | None  # None: the base model
    overall: dict[str, float | None]
    num_prompts: int


class TrainOutput(StageResult):
    out_dir: str
    steps: int
    resumed_from_step: int
    final_loss: float | None
    useful_tokens_per_second: float | None
    learning_rate: float
    lora: dict[str, Any]  # rank and target layers: the tuned model is rebuilt with exactly these
    prompt_format: str | None = None  # the data's format the adapter was trained in

    def adapter(self) -> AdapterRef:
        return AdapterRef(file=self.files["adapter"], lora=self.lora, prompt_format=self.prompt_format)


class ReportResult(StageResult):
    report_dir: str
    answers_changed: int
    num_prompts: int
