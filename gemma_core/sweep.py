"""Expand the config's ``sweep`` section into its grid of training points: the challengers of a run.

Fields are taken in sorted order (``lora.*`` before ``train.*``), each field's values in the order given,
and the grid is their product, the first field varying slowest; ``sweep.max_points`` keeps the first N.
Without a sweep there is one point, the config itself, labelled ``default``.

>>> from gemma_core.config import load_config
>>> cfg = load_config(overrides={"sweep.train.learning_rate": [2e-4, 5e-4], "sweep.lora.rank": [4, 8]})
>>> [point.label for point in sweep_points(cfg)]
['rank=4,lr=0.0002', 'rank=4,lr=0.0005', 'rank=8,lr=0.0002', 'rank=8,lr=0.0005']
>>> point = sweep_points(cfg)[1]
>>> point.overrides, point.config.train.learning_rate, point.config.lora.rank
({'lora.rank': 4, 'train.learning_rate': 0.0005}, 0.0005, 4)
>>> [point.label for point in sweep_points(load_config(overrides={"sweep.lora.rank": [4, 8], "sweep.max_points": 1}))]
['rank=4']
>>> [(point.label, point.config == load_config()) for point in sweep_points(load_config())]
[('default', True)]
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from gemma_core.config import SWEEP_SECTIONS, ConfigError, PipelineConfig, SweepConfig

NO_SWEEP_LABEL = "default"
MAX_POINTS = 10_000  # each point is a training run: a grid this large is a mistake, not a plan
MAX_LABEL = 80  # characters; a longer label keeps its start and gets a hash of the whole point
# Short names in labels for the fields people sweep most; any other field is named as it is.
SHORT_NAMES = {"learning_rate": "lr", "weight_decay": "wd", "sequence_length": "seq_len", "batch_size": "bs",
               "max_steps": "steps", "target_layer_names": "layers"}


@dataclass(frozen=True)
class SweepPoint:
    index: int  # position in the grid, from 0
    label: str  # short, stable, safe in file names and Prefect run names: "rank=8,lr=0.0005"
    overrides: dict[str, Any]  # dotted field -> value, e.g. {"lora.rank": 8, "train.learning_rate": 0.0005}
    config: PipelineConfig  # the base config with those values, and no sweep section of its own

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "overrides": dict(self.overrides)}


def grid_size(cfg: PipelineConfig) -> int:
    """Points in the whole grid, before ``sweep.max_points`` (1 without a sweep)."""
    size = 1
    for _, values in _fields(cfg.sweep):
        size *= len(values)
    return size


def sweep_points(cfg: PipelineConfig) -> list[SweepPoint]:
    """The training points of ``cfg``'s sweep, each a full, validated config (see the module docstring).

    Raises ConfigError, naming the point and the field, when a combination of values is refused.
    """
    fields = _fields(cfg.sweep)
    if not fields:
        return [SweepPoint(0, NO_SWEEP_LABEL, {}, cfg)]
    wanted = grid_size(cfg) if cfg.sweep.max_points is None else min(cfg.sweep.max_points, grid_size(cfg))
    if wanted > MAX_POINTS:
        raise ConfigError(f"sweep: the grid has {grid_size(cfg)} points (each one a training run), more than "
                          f"{MAX_POINTS}; set sweep.max_points or try fewer values")
    names = [dotted for dotted, _ in fields]
    combos = itertools.islice(itertools.product(*(values for _, values in fields)), wanted)
    points = []
    for index, combo in enumerate(combos):
        overrides = dict(zip(names, combo))
        points.append(SweepPoint(index, _label(overrides), overrides, _apply(cfg, overrides)))
    return _unique_labels(points)


def _fields(sweep: SweepConfig) -> list[tuple[str, list[Any]]]:
    found = [(f"{section}.{name}", values)
             for section in SWEEP_SECTIONS for name, values in getattr(sweep, section).items()]
    return sorted(found)


def _apply(cfg: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    update: dict[str, Any] = {"sweep": SweepConfig()}
    for section, model in SWEEP_SECTIONS.items():
        values = {dotted.partition(".")[2]: v for dotted, v in overrides.items() if dotted.startswith(section + ".")}
        if not values:
            continue
        try:
            update[section] = model.model_validate({**getattr(cfg, section).model_dump(), **values})
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, (section, *e['loc'])))} = {e.get('input')!r}: {e['msg']}"
                                 for e in err.errors())
            raise ConfigError(f"sweep point {_label(overrides)} is refused: {problems}") from None
    return cfg.model_copy(update=update)


def _label(overrides: dict[str, Any]) -> str:
    parts = []
    for dotted, value in overrides.items():
        name = dotted.partition(".")[2]
        parts.append(f"{SHORT_NAMES.get(name, name)}={_value_text(value)}")
    label = ",".join(parts)
    if len(label) > MAX_LABEL:
        label = f"{label[:MAX_LABEL - 10]}~{_digest(overrides)}"
    return label


def _value_text(value: Any) -> str:
    if value is None:
        text = "none"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = "+".join(_value_text(v) for v in value) or "empty"
    else:
        text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def _digest(overrides: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def _unique_labels(points: list[SweepPoint]) -> list[SweepPoint]:
    """Values that read the same once made safe ("a b" and "a_b") get a hash so no two labels collide."""
    seen: dict[str, int] = {}
    for point in points:
        seen[point.label] = seen.get(point.label, 0) + 1
    return [p if seen[p.label] == 1 else SweepPoint(p.index, f"{p.label}~{_digest(p.overrides)}", p.overrides, p.config)
            for p in points]
