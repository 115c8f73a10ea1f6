import pytest

from gemma_core.config import ConfigError, PipelineConfig, load_config


def test_defaults_are_valid_and_frozen():
    cfg = load_config()
    assert cfg.model.spec == "embedded:gemma3-270m" and cfg.data.source == "sample"
    with pytest.raises(Exception):
        cfg.train.learning_rate = 1.0


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 0.001\n  batch_size: 2\nlora:\n  rank: 8\n")
    cfg = load_config(path, ["train.batch_size=3", "lora.target_layer_names=[query, key]"])
    assert (cfg.train.learning_rate, cfg.train.batch_size, cfg.lora.rank) == (0.001, 3, 8)
    assert cfg.lora.target_layer_names == ("query", "key")


@pytest.mark.parametrize(
    "override, field, allowed",
    [
        ("lora.rank=0", "lora.rank", "greater than or equal to 1"),
        ("lora.rank=257", "lora.rank", "less than or equal to 256"),
        ("train.learning_rate=0", "train.learning_rate", "greater than 0"),
        ("train.sequence_length=8", "train.sequence_length", "greater than or equal to 16"),
        ("train.sequence_length=9000", "train.sequence_length", "less than or equal to 8192"),
        ("data.eval_fraction=0", "data.eval_fraction", "greater than 0"),
        ("data.eval_fraction=0.6", "data.eval_fraction", "less than or equal to 0.5"),
        ("generation.sampler=beam", "generation.sampler", "'greedy', 'top_k' or 'top_p'"),
        ("train.batch_size=many", "train.batch_size", "valid integer"),
    ],
)
def test_bad_value_names_field_value_and_what_is_allowed(override, field, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    message = str(err.value)
    assert field in message and allowed in message
    assert repr(override.split("=")[1]).strip("'") in message


def test_unknown_keys_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr: unknown key"):
        load_config(overrides=["train.lr=1"])
    path = tmp_path / "c.yaml"
    path.write_text("trainn:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match="trainn: unknown key"):
        load_config(path)


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(overrides=["learning_rate"])


def test_section_hash_changes_only_with_its_section():
    a, b = PipelineConfig(), load_config(overrides=["train.learning_rate=1e-3"])
    assert a.section_hash("data") == b.section_hash("data")
    assert a.section_hash("train") != b.section_hash("train")
