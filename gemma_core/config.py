"""One typed config: the single source of parameters for the CLI, the flows and the deployments.

Every section is a frozen pydantic model that rejects unknown keys, so a typo in YAML or on the
command line fails before any work starts, naming the field, the value and what is allowed.

>>> cfg = load_config(overrides=["train.learning_rate=1e-4", "lora.rank=8"])
>>> cfg.train.learning_rate, cfg.lora.rank
(0.0001, 8)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DOLLY_HUB_SOURCE = "hf://databricks/databricks-dolly-15k"
SAMPLE_SOURCE = "sample"
EMBEDDED_MODEL = "embedded:gemma3-270m"


class ConfigError(ValueError):
    """A parameter is invalid; the message names the field, the value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class DataConfig(_Section):
    source: str = Field(
        SAMPLE_SOURCE,
        description=f"'{SAMPLE_SOURCE}' (offline sample shipped with the project), "
        f"'{DOLLY_HUB_SOURCE}', or a local .jsonl/.json/.parquet/.csv file",
    )
    eval_fraction: float = Field(0.1, gt=0, le=0.5, description="share of rows held out, per category")
    seed: int = Field(0, description="seed of the stratified train/eval split")
    # 160 rows = 40 steps an epoch at batch 4: the default run finishes on a 2-core CPU in minutes and
    # still moves the 270M model measurably (see TrainConfig.learning_rate).
    train_limit: int | None = Field(160, ge=1, description="keep at most this many training rows (null: all)")
    eval_limit: int | None = Field(None, ge=1, description="keep at most this many held-out rows")
    strip_citations: bool = Field(True, description="remove Wikipedia citation marks like [42] from context")
    # 'auto' never reaches a stage: PipelineConfig resolves it against model.spec, so cache keys and
    # manifests hold the format actually used (gemma_core.prompts.default_prompt_format).
    prompt_format: Literal["auto", "instruction", "gemma_chat"] = Field(
        "auto", description="'instruction' (the tutorial's Instruction:/Response: template), 'gemma_chat' "
        "(Gemma 3's <start_of_turn> turns, the answer closed by <end_of_turn>), or 'auto': gemma_chat for "
        "instruct models (spec naming 'instruct' or an -it hub model), instruction for base models")
    eval_source: str | None = Field(
        None, description="a separate held-out set in Dolly's schema (local file or hf:// dataset, as "
        "data.source), used as the evaluation split instead of data.eval_fraction of data.source")

    @field_validator("source")
    @classmethod
    def _source_form(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(f"must be '{SAMPLE_SOURCE}', an hf:// dataset or a local file path")
        return _no_nul(value)

    @field_validator("eval_source")
    @classmethod
    def _eval_source_form(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be an hf:// dataset or a local file path (null: hold out data.eval_fraction)")
        return _no_nul(value)


def _no_nul(value):
    """Paths reach the OS, which cannot take a NUL character: refuse it here, naming the field."""
    if value is not None and "\x00" in str(value):
        raise ValueError("contains a NUL character (\\x00), which no file path can hold")
    return value


class ModelConfig(_Section):
    spec: str = Field(
        EMBEDDED_MODEL,
        description="embedded:gemma3-270m, a keras-hub preset name (gemma3_1b, ...), "
        "hf://org/name, or a local Keras preset directory",
    )
    cache_dir: Path | None = Field(None, description="where converted models are cached (user cache dir if unset)")

    _paths = field_validator("spec", "cache_dir")(_no_nul)


class LoraConfig(_Section):
    rank: int = Field(4, ge=1, le=256, description="LoRA rank")
    target_layer_names: tuple[str, ...] | None = Field(
        None, description="layers that get adapters; None means keras-hub's default (query and value)"
    )
    trainable_tokens: tuple[str, ...] | None = Field(
        None, description="tokens whose embedding rows train beside the adapter (PEFT's trainable tokens); "
        "None: Gemma's turn markers when data.prompt_format is gemma_chat (a base model has never said "
        "<end_of_turn>), none otherwise; [] for none"
    )


class TrainConfig(_Section):
    # Chosen by held-out loss on the 270M model and the offline sample (bench/RESULTS.md): the
    # tutorial's 5e-5 barely moves a run this short; for a full Dolly epoch, 1e-4 to 2e-4 is safer.
    learning_rate: float = Field(5e-4, gt=0, le=1.0, description="AdamW learning rate")
    weight_decay: float = Field(0.01, ge=0, le=1.0, description="AdamW weight decay (not on biases or scales)")
    sequence_length: int = Field(128, ge=16, le=8192, description="tokens per example, prompt plus response")
    batch_size: int = Field(4, ge=1, le=1024)
    # Two passes over the default 160 rows: in gemma_chat one pass left 13-14 of 16 held-out answers ending
    # their turn (seeds 0 and 1), two passes 15 and 16 (bench/RESULTS.md).
    epochs: int = Field(2, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    seed: int = Field(0, description="seed for shuffling and adapter initialisation")
    checkpoint_every: int = Field(8, ge=1, description="save a resumable checkpoint every N steps")
    bucketing: bool = Field(True, description="batch examples of similar length in a few fixed shapes "
                            "(false: pad every example to sequence_length, the plain keras-hub path)")
    response_only_head: bool = Field(True, description="compute the output head only at response tokens, "
                                     "where the loss is (false: on every position, the plain path)")
    keep_checkpoints: int = Field(2, ge=1, le=100, description="how many recent checkpoints to keep")
    data_parallel: Literal["off", "auto"] = Field(
        "off", description="auto: split each batch across every local device (Keras' DataParallel, JAX; "
        "batch_size a multiple of the device count); off: one device")

    # How often checkpoints are written and how many are kept never changes the adapter; the devices
    # a batch is split over change it only by float rounding (tests/test_data_parallel.py).
    NOT_IN_CACHE_KEY: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "keep_checkpoints", "data_parallel"})

    def cache_identity(self) -> dict[str, Any]:
        """What of this config a cache key (and the training directory's name) sees."""
        return self.model_dump(mode="json", exclude=set(self.NOT_IN_CACHE_KEY))


class GenerationConfig(_Section):
    sampler: Literal["greedy", "top_k", "top_p"] = "greedy"
    top_k: int = Field(5, ge=1, le=1000)
    top_p: float = Field(0.9, gt=0, le=1.0)
    temperature: float = Field(1.0, gt=0, le=10.0)
    max_new_tokens: int = Field(64, ge=1, le=4096)
    batch_size: int = Field(16, ge=1, le=512, description="prompts per generate call (the last batch is padded; "
                            "the fastest measured on a 2-core CPU, bench/RESULTS.md)")
    seed: int = 0
    compact_decode: bool = Field(True, description="prefill only the prompts, decode each row from its own "
                                 "prompt's end, stop at max_new_tokens (Gemma 3 on JAX or TensorFlow; false, or "
                                 "another model or backend: keras-hub's generate loop, the plain path)")


class EvalConfig(_Section):
    num_prompts: int = Field(16, ge=1, description="held-out prompts used for generation and scoring")
    num_side_by_side: int = Field(6, ge=0, description="answers shown side by side in the report")


class ExportConfig(_Section):
    """What ``gemma-lora export`` writes (``--format``, ``--quant`` and ``--overwrite`` set these)."""

    format: Literal["keras", "gguf"] = Field(
        "keras", description="keras: the adapter, a merged Keras preset and Hugging Face safetensors; "
        "gguf: a merged llama.cpp GGUF with an Ollama Modelfile and a README")
    quant: Literal["f32", "f16", "bf16", "q8_0"] = Field(
        "f16", description="GGUF weight type of the 2-D weights (norms stay f32); gguf format only")
    context_length: int = Field(32_768, ge=128, le=1_048_576, description="context length written to the GGUF "
                                "(Gemma 3 270M and 1B: 32768; 4B and larger: 131072)")
    overwrite: bool = Field(False, description="replace a GGUF that already exists at the target")


class OutputConfig(_Section):
    root: Path = Field(Path("runs"), description="where run outputs (Parquet, adapters, reports) land")

    _paths = field_validator("root")(_no_nul)


class PromotionConfig(_Section):
    """When a challenger replaces the champion: the registry it is recorded in, the gate (gemma_core/gate.py)
    and the optional approval."""

    # The champion is mirrored as the Prefect Variable gemma-lora-champion-<registry>, and Prefect
    # Variable names take lowercase letters, digits, '-' and '_' only: a name that could not be
    # mirrored is refused here, not after a training run.
    registry: str = Field("default", pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=100,
                          description="pipeline name: one champion and one history per name "
                          "(lowercase letters, digits, '-', '_')")
    primary_metric: Literal["completion_loss", "rouge_l_f1"] = Field(
        "completion_loss", description="the metric the challenger must improve (held-out loss or ROUGE-L)")
    margin: float = Field(0.0, allow_inf_nan=False, description="the improvement's lower confidence bound "
                          "must exceed this, in the primary metric's units (negative: allow a small loss)")
    # A category is two prompts in the default run, and how much one prompt's change differs from
    # another's in the same category is large for the loss and moderate for ROUGE-L. Each margin is
    # about 2.5 standard errors of a two-prompt category's change, so that the eight categories of a
    # challenger that is no worse anywhere block it by chance only about one time in twenty, while a
    # ruined category moves far more. More prompts per category make smaller margins affordable.
    category_loss_margin: float = Field(0.45, ge=0, allow_inf_nan=False, description="a category whose "
                                        "held-out loss rises by more than this (nats per token) blocks a promotion")
    category_rouge_margin: float = Field(0.1, ge=0, le=1, allow_inf_nan=False, description="a category "
                                         "whose ROUGE-L falls by more than this blocks a promotion")
    # A prompt is listed as got worse when its ROUGE-L falls by more than a tenth of the scale (one
    # prompt's ROUGE-L moves by several hundredths between honest models, as the wording of a greedy
    # answer changes), or its held-out loss rises by more than 0.1 nats per token (about 10% in perplexity).
    flip_rouge_drop: float = Field(0.1, ge=0, le=1, allow_inf_nan=False,
                                   description="a prompt whose ROUGE-L falls by more than this is listed as got worse")
    flip_loss_rise: float = Field(0.1, ge=0, allow_inf_nan=False, description="a prompt whose held-out loss rises "
                                  "by more than this (nats per token) is listed as got worse")
    resamples: int = Field(2000, ge=100, le=1_000_000, description="bootstrap resamples of the prompts")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="level of the improvement's interval")
    seed: int = Field(0, description="seed of the bootstrap")
    require_approval: bool = Field(False, description="pause after a passing gate until a person approves")
    approval_timeout_s: int = Field(3600, ge=1, description="an approval not given within this is a rejection")


class RecoveryConfig(_Section):
    """How deployed runs heal after a crash and react to new data: the automations, the trigger and the
    watch-data schedule that deployments/setup_local.py installs (deployments/automations.py), and how
    long a pipeline waits for its crashed training run to be resumed."""

    heartbeat_s: int = Field(60, ge=30, description="seconds between a flow run's heartbeats "
                             "(PREFECT_FLOWS_HEARTBEAT_FREQUENCY; Prefect's minimum is 30)")
    crashed_after_s: int = Field(200, ge=90, description="a run with no heartbeat for this long is marked Crashed "
                                 "(cover about three heartbeats, so that one late heartbeat is no crash)")
    max_resumes: int = Field(2, ge=0, le=20, description="a crashed run of the deployments is started again at "
                             "most this many times (0: never), resuming from its newest checkpoint")
    settle_s: int = Field(20, ge=10, description="a crashed run is resumed, or given up, once nothing else has "
                          "happened to it for this long (a process worker reports one death twice, seconds apart; "
                          "the second report must find the run still Crashed, not crash its next attempt)")
    resume_wait_s: int = Field(180, ge=0, description="how long a pipeline waits for its crashed training run to "
                               "be resumed by the automation before it fails")
    watch_every_s: int = Field(300, ge=10, description="how often the watch-data deployment fingerprints the data")
    debounce_s: int = Field(600, ge=0, description="after a data change starts a pipeline run, further changes "
                            "within this window start no other run")

    @model_validator(mode="after")
    def _window_covers_heartbeats(self) -> "RecoveryConfig":
        if self.crashed_after_s < 2 * self.heartbeat_s + 30:
            raise ValueError(f"recovery.crashed_after_s={self.crashed_after_s} must cover at least two heartbeats of "
                             f"recovery.heartbeat_s={self.heartbeat_s} plus 30 s: set recovery.crashed_after_s to "
                             f"{3 * self.heartbeat_s + 20} (about three heartbeats) or lower recovery.heartbeat_s, "
                             "or a healthy run is marked Crashed")
        return self


SWEEP_SECTIONS: dict[str, type[_Section]] = {"train": TrainConfig, "lora": LoraConfig}


def nest_sweep_keys(section: Any) -> Any:
    """``{"train.learning_rate": [...]}`` (the dotted form YAML allows) as ``{"train": {"learning_rate": [...]}}``."""
    def dotted(key: Any) -> bool:
        return isinstance(key, str) and "." in key

    if not isinstance(section, Mapping) or not any(dotted(k) for k in section):
        return section
    nested = {k: dict(v) if isinstance(v, Mapping) else v for k, v in section.items() if not dotted(k)}
    for key, value in section.items():
        if not dotted(key):
            continue
        part, _, name = key.partition(".")
        if part not in SWEEP_SECTIONS:
            raise ValueError(f"sweep.{key}: only {' and '.join(f'{s}.*' for s in SWEEP_SECTIONS)} fields can be swept")
        group = nested.setdefault(part, {})
        if not isinstance(group, dict):
            raise ValueError(f"sweep.{part} = {group!r} is not a mapping, yet sweep.{key} is given too")
        if name in group:
            raise ValueError(f"sweep.{part}.{name} is given twice (as sweep.{key} and inside sweep.{part})")
        group[name] = value
    return nested


class SweepConfig(_Section):
    """Values to try for training fields: their grid is the challengers (gemma_core/sweep.py expands it).

    Empty (the default): no sweep, one challenger trained with the config as it is.
    """

    train: dict[str, list[Any]] = Field({}, description="train field -> values to try, "
                                        "e.g. {learning_rate: [2e-4, 5e-4, 1e-3]}")
    lora: dict[str, list[Any]] = Field({}, description="lora field -> values to try, "
                                       "e.g. {rank: [4, 8]}")
    max_points: int | None = Field(None, ge=1, description="train only the first N points of the grid (null: all)")

    def __hash__(self) -> int:  # the dicts are not hashable; the config as a whole must stay so
        return hash(json.dumps(self.model_dump(mode="json"), sort_keys=True))

    @model_validator(mode="before")
    @classmethod
    def _dotted_keys(cls, data: Any) -> Any:
        return nest_sweep_keys(data)

    @field_validator("train", "lora", mode="before")
    @classmethod
    def _lists(cls, value: Any, info) -> Any:
        if isinstance(value, Mapping):
            for name, values in value.items():
                if not isinstance(values, (list, tuple)):
                    raise ValueError(f"sweep.{info.field_name}.{name} = {values!r}: must be a list of values "
                                     "to try, e.g. [2e-4, 5e-4]")
        return value

    @field_validator("train", "lora")
    @classmethod
    def _sweepable(cls, value: dict[str, list[Any]], info) -> dict[str, list[Any]]:
        section = info.field_name
        target = SWEEP_SECTIONS[section]
        fixed = getattr(target, "NOT_IN_CACHE_KEY", frozenset())
        checked: dict[str, list[Any]] = {}
        for name, values in value.items():
            dotted = f"sweep.{section}.{name}"
            if name not in target.model_fields:
                allowed = ", ".join(n for n in target.model_fields if n not in fixed)
                raise ValueError(f"{dotted}: {section} has no field {name!r}; fields that can be swept: {allowed}")
            if name in fixed:
                raise ValueError(f"{dotted}: {section}.{name} does not change the trained adapter (it is not "
                                 "part of its cache key), so sweeping it would train the same adapter again")
            if not values:
                raise ValueError(f"{dotted} = []: give at least one value to try")
            normalised: list[Any] = []
            for item in values:
                try:
                    one = target.model_validate({name: item}).model_dump(mode="json")[name]
                except ValidationError as err:
                    raise ValueError(f"{dotted} value {item!r}: {err.errors()[0]['msg']}") from None
                if one in normalised:
                    raise ValueError(f"{dotted}: the value {item!r} is listed twice")
                normalised.append(one)
            checked[name] = normalised
        return checked

    def is_empty(self) -> bool:
        return not self.train and not self.lora


class PipelineConfig(_Section):
    backend: Literal["jax", "tensorflow"] = Field("jax", description="Keras backend")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    generation: GenerationConfig = GenerationConfig()
    evaluation: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    export: ExportConfig = ExportConfig()
    sweep: SweepConfig = SweepConfig()
    promotion: PromotionConfig = PromotionConfig()
    recovery: RecoveryConfig = RecoveryConfig()

    @model_validator(mode="before")
    @classmethod
    def _resolve_prompt_format(cls, data: Any) -> Any:
        """``data.prompt_format: auto`` becomes the model's format here, once, so every stage, cache key
        and manifest sees the format actually used."""
        if not isinstance(data, Mapping):
            return data
        from gemma_core.prompts import default_prompt_format

        section, model = data.get("data", {}), data.get("model", {})
        if isinstance(model, ModelConfig):
            spec = model.spec
        elif isinstance(model, Mapping):
            spec = model.get("spec", EMBEDDED_MODEL)
        else:
            return data  # not a section: validation names it
        if isinstance(section, DataConfig):
            if section.prompt_format == "auto":
                return {**data, "data": section.model_copy(update={"prompt_format": default_prompt_format(spec)})}
        elif isinstance(section, Mapping) and section.get("prompt_format", "auto") == "auto" and isinstance(spec, str):
            return {**data, "data": {**section, "prompt_format": default_prompt_format(spec)}}
        return data

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections (all when none named), for cache keys and metadata."""
        dumped = self.model_dump(mode="json")
        picked = {name: dumped[name] for name in (sections or dumped)}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()
) -> PipelineConfig:
    """Build the config from an optional YAML file plus ``section.field=value`` overrides.

    Values in overrides are parsed as YAML scalars (``1e-4``, ``true``, ``null``, ``[q, v]``).
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
        if "sweep" in data:  # dotted keys nested first, so that an override of the same field replaces it
            try:
                data["sweep"] = nest_sweep_keys(data["sweep"])
            except ValueError as err:
                raise ConfigError(f"invalid configuration:\n  {err}") from None
    items = overrides.items() if isinstance(overrides, Mapping) else (_split_override(o) for o in overrides)
    for dotted, value in items:
        _set_dotted(data, dotted, value)
    return validate_config(data)


def validate_config(data: Mapping[str, Any]) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def format_validation_error(err: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key; check the spelling (see `gemma-lora run --help`)")
        else:
            lines.append(f"  {field} = {e.get('input')!r}: {e['msg']}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested too deeply to be a config") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"config file {path} holds a value that cannot be read: {err}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.field=value, e.g. train.learning_rate=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except (yaml.YAMLError, ValueError, RecursionError):  # kept as text: validation names the field
        value = raw
    return key.strip(), value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {name!r} is a value, not a section")
        node = child
    node[leaf] = value
