"""The tiny pipeline's config: the tiny random Gemma preset, 8 training examples, 4 optimizer steps, 4
held-out prompts. A whole run takes 20-60 s on a 2-core CPU. The pipeline tests (tests/test_pipeline.py),
the deployment stack (tests/helpers/stack.py) and the reliability tests (tests/helpers/procs.py's
``--set`` options) all run this one config."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_pipeline_config(preset: Path | str, root: Path | str, **overrides: Any) -> dict[str, dict[str, Any]]:
    """Config sections (as ``gemma_lora_pipeline(config=...)`` takes them) for ``preset`` with outputs
    under ``root``. ``overrides`` are ``section__field=value``: ``train__learning_rate=1e-3``."""
    cfg: dict[str, dict[str, Any]] = {
        "model": {"spec": str(preset)},
        "output": {"root": str(root)},
        "data": {"train_limit": 8},
        "train": {"max_steps": 4, "batch_size": 2, "sequence_length": 96, "checkpoint_every": 2},
        "generation": {"max_new_tokens": 6, "batch_size": 4},
        "evaluation": {"num_prompts": 4, "num_side_by_side": 2},
    }
    for key, value in overrides.items():
        section, sep, field = key.partition("__")
        if not (sep and section and field):
            raise ValueError(f"override {key!r}: expected section__field")
        cfg.setdefault(section, {})[field] = value
    return cfg
