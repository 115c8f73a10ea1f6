"""The sweep section (gemma_core/config.py) and its grid of training points (gemma_core/sweep.py)."""

from __future__ import annotations

import doctest
import hashlib
import json
import re

import pytest
from pydantic import model_validator

from gemma_core import sweep
from gemma_core.config import ConfigError, LoraConfig, PipelineConfig, TrainConfig, load_config
from gemma_core.sweep import sweep_points


def test_module_example_runs():
    assert doctest.testmod(sweep).failed == 0


def test_no_sweep_is_one_point_equal_to_the_config():
    cfg = load_config(overrides=["train.learning_rate=1e-4"])
    (point,) = sweep_points(cfg)
    assert point.label == "default" and point.overrides == {} and point.config is cfg and point.index == 0
    assert cfg.sweep.is_empty() and sweep.grid_size(cfg) == 1


def test_grid_order_is_sorted_fields_then_given_values(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("sweep: {train.learning_rate: [1.0e-3, 2.0e-4, 5.0e-4], lora.rank: [8, 4]}\n")
    cfg = load_config(path, ["train.epochs=2"])
    points = sweep_points(cfg)
    assert [p.overrides for p in points] == [
        {"lora.rank": r, "train.learning_rate": lr} for r in (8, 4) for lr in (1e-3, 2e-4, 5e-4)]
    assert [p.label for p in points][:3] == ["rank=8,lr=0.001", "rank=8,lr=0.0002", "rank=8,lr=0.0005"]
    assert [p.index for p in points] == list(range(6)) and sweep.grid_size(cfg) == 6
    for p in points:
        assert (p.config.lora.rank, p.config.train.learning_rate) == (p.overrides["lora.rank"],
                                                                       p.overrides["train.learning_rate"])
        assert p.config.train.epochs == 2 and p.config.data == cfg.data  # the rest is the base config
        assert p.config.sweep.is_empty() and sweep_points(p.config)[0].config is p.config
    assert sweep_points(cfg) == points  # stable


def test_max_points_keeps_the_first_n():
    cfg = load_config(overrides={"sweep.train.learning_rate": [2e-4, 5e-4, 1e-3], "sweep.lora.rank": [4, 8],
                                 "sweep.max_points": 4})
    assert [p.label for p in sweep_points(cfg)] == ["rank=4,lr=0.0002", "rank=4,lr=0.0005", "rank=4,lr=0.001",
                                                    "rank=8,lr=0.0002"]
    assert sweep.grid_size(cfg) == 6
    big = load_config(overrides={"sweep.max_points": 100, "sweep.lora.rank": [4, 8]})
    assert len(sweep_points(big)) == 2


@pytest.mark.parametrize("how", ["yaml dotted", "yaml nested", "override", "mapping"])
def test_the_three_spellings_give_the_same_sweep(tmp_path, how):
    path = tmp_path / "c.yaml"
    if how == "yaml dotted":
        path.write_text("sweep: {train.learning_rate: [2e-4, 5e-4], lora.rank: [4, 8]}\n")
        cfg = load_config(path)
    elif how == "yaml nested":
        path.write_text("sweep:\n  train: {learning_rate: [2e-4, 5e-4]}\n  lora: {rank: [4, 8]}\n")
        cfg = load_config(path)
    elif how == "override":
        cfg = load_config(overrides=["sweep.train.learning_rate=[2e-4,5e-4]", "sweep.lora.rank=[4, 8]"])
    else:
        cfg = load_config(overrides={"sweep": {"train.learning_rate": ["2e-4", 5e-4], "lora": {"rank": [4, 8]}}})
    # YAML reads 2e-4 as text; the field's own validation makes it the number
    assert cfg.sweep.train == {"learning_rate": [2e-4, 5e-4]} and cfg.sweep.lora == {"rank": [4, 8]}


def test_an_override_replaces_the_same_field_from_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sweep: {train.learning_rate: [2e-4, 5e-4, 1e-3], lora.rank: [4, 8]}\n")
    cfg = load_config(path, ["sweep.train.learning_rate=[1e-4]"])
    assert cfg.sweep.train == {"learning_rate": [1e-4]} and cfg.sweep.lora == {"rank": [4, 8]}


@pytest.mark.parametrize("overrides, field, says", [
    ({"sweep.train.learnin_rate": [1e-4]}, "sweep.train.learnin_rate", "train has no field 'learnin_rate'"),
    ({"sweep.lora.alpha": [8]}, "sweep.lora.alpha", "lora has no field 'alpha'"),
    ({"sweep.train.learning_rate": []}, "sweep.train.learning_rate", "at least one value"),
    ({"sweep.train.learning_rate": 1e-4}, "sweep.train.learning_rate", "must be a list"),
    ({"sweep.train.learning_rate": "[1e-4"}, "sweep.train.learning_rate", "must be a list"),
    ({"sweep.train.learning_rate": [1e-4, -1]}, "sweep.train.learning_rate", "value -1: Input should be greater"),
    ({"sweep.lora.rank": [4, 0]}, "sweep.lora.rank", "value 0: Input should be greater than or equal to 1"),
    ({"sweep.train.batch_size": [4, "many"]}, "sweep.train.batch_size", "valid integer"),
    ({"sweep.train.learning_rate": [1e-4, 0.0001]}, "sweep.train.learning_rate", "listed twice"),
    ({"sweep.train.checkpoint_every": [4, 8]}, "sweep.train.checkpoint_every", "not part of its cache key"),
    ({"sweep.train.keep_checkpoints": [1, 2]}, "sweep.train.keep_checkpoints", "not part of its cache key"),
    ({"sweep": {"data.source": ["a"]}}, "sweep.data.source", "only train.* and lora.*"),
    ({"sweep.model.spec": ["a"]}, "sweep.model", "unknown key"),
    ({"sweep.max_points": 0}, "sweep.max_points", "greater than or equal to 1"),
    ({"sweep": {"train.learning_rate": [1e-4], "train": {"learning_rate": [2e-4]}}}, "sweep.train.learning_rate",
     "given twice"),
])
def test_a_bad_sweep_is_refused_before_any_work_naming_the_field(overrides, field, says):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert field in str(err.value) and says in str(err.value), str(err.value)


def test_cache_key_fields_are_exactly_the_sweepable_ones():
    with pytest.raises(ConfigError, match="fields that can be swept: learning_rate, weight_decay"):
        load_config(overrides={"sweep.train.lr": [1]})
    for name in TrainConfig.model_fields:
        if name in TrainConfig.NOT_IN_CACHE_KEY:
            continue
        value = TrainConfig().model_dump(mode="json")[name]
        assert load_config(overrides={f"sweep.train.{name}": [value]}).sweep.train == {name: [value]}
    for name in LoraConfig.model_fields:
        assert load_config(overrides={f"sweep.lora.{name}": [None if name != "rank" else 2]})


def test_labels_are_safe_short_and_unique():
    cfg = load_config(overrides={
        "sweep.lora.target_layer_names": [["query", "value"], ["query", "key", "value", "attention_output"], None],
        "sweep.train.weight_decay": [0.0, 1e-5], "sweep.train.bucketing": [True, False],
        "sweep.train.max_steps": [None, 10]})
    points = sweep_points(cfg)
    labels = [p.label for p in points]
    assert len(set(labels)) == len(labels) == 24
    assert labels[0] == "layers=query+value,bucketing=true,steps=none,wd=0.0"
    assert "layers=none,bucketing=false,steps=10,wd=1e-05" in labels
    for label in labels:
        assert re.fullmatch(r"[A-Za-z0-9._+=,~-]+", label) and len(label) <= sweep.MAX_LABEL
    # tuple values reach the config as the field's own type
    assert points[0].config.lora.target_layer_names == ("query", "value")
    assert points[-1].config.lora.target_layer_names is None


def test_a_long_label_is_cut_with_a_hash_of_the_point():
    names = [f"layer_{i:02d}" for i in range(30)]
    cfg = load_config(overrides={"sweep.lora.target_layer_names": [names, names[:29]]})
    first, second = (p.label for p in sweep_points(cfg))
    assert len(first) <= sweep.MAX_LABEL and first != second and "~" in first
    digest = hashlib.sha256(json.dumps({"lora.target_layer_names": names}, sort_keys=True).encode()).hexdigest()
    assert first.endswith(digest[:8])


class _RankAtMost4(LoraConfig):
    @model_validator(mode="after")
    def _small(self):
        if self.rank > 4:
            raise ValueError("rank above 4")
        return self


def test_a_combination_the_config_refuses_names_the_point(monkeypatch):
    """No two train or lora fields depend on each other today; if one ever does, the point is named."""
    cfg = load_config(overrides={"sweep.lora.rank": [4, 8]})
    monkeypatch.setattr(sweep, "SWEEP_SECTIONS", {"lora": _RankAtMost4, "train": TrainConfig})
    with pytest.raises(ConfigError, match=r"sweep point rank=8 is refused: lora = .*rank above 4"):
        sweep_points(cfg)


def test_a_huge_grid_needs_max_points():
    cfg = load_config(overrides={"sweep.train.seed": list(range(200)), "sweep.lora.rank": list(range(1, 101))})
    with pytest.raises(ConfigError, match="20000 points.*sweep.max_points"):
        sweep_points(cfg)
    assert len(sweep_points(load_config(overrides={**{"sweep.max_points": 3}, "sweep.train.seed": list(range(200)),
                                                    "sweep.lora.rank": list(range(1, 101))}))) == 3


def test_a_swept_config_is_hashable_and_round_trips_through_json():
    cfg = load_config(overrides={"sweep.lora.rank": [4, 8], "sweep.lora.target_layer_names": [["query"]]})
    assert hash(cfg) == hash(PipelineConfig.model_validate_json(cfg.model_dump_json()))
    assert PipelineConfig.model_validate(cfg.model_dump(mode="json")) == cfg
