"""Which model ``gemma-lora generate`` and ``gemma-lora chat`` talk to (``--model``), and loading it.

- ``base``: the config's ``model.spec`` alone (default: the embedded Gemma 3 270M);
- ``champion``: the registry's champion adapter on the base model it was tuned on (the last run's
  resolved model, checked by content hash, as ``gemma-lora export`` does: ``flows/cli_champion.py``);
- ``latest``: the last run's tuned adapter on that run's model;
- a path: a ``.lora.h5`` file, or a directory holding ``adapter.lora.h5`` (a training directory
  ``runs/train/train-<key>/``, one of its checkpoints, an export directory), on ``model.spec`` when
  given, else on the last run's model unless the adapter's training identity names another model;
- nothing: the champion when the registry has one, else the base model (and it says so).

The adapter's rank comes from the adapter (its record, or the file itself); an explicit
``--set lora.rank`` that differs is refused, and so is an adapter whose layers do not fit the base
model (:mod:`gemma_core.adapter_file`). The prompt format is the one the adapter was trained in
(its run's config or checkpoint identity); an explicit ``--set data.prompt_format`` that differs is
refused. Reads files only: no Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from flows.cli_champion import CommandError, export_inputs, open_registry
from flows.storage import read_latest
from gemma_core.config import LoraConfig, PipelineConfig

MODEL_CHOICES = ("base", "champion", "latest")
MODEL_HELP = ("base | champion | latest | PATH (a .lora.h5 adapter, or a directory holding adapter.lora.h5: "
              "runs/train/train-<key>/, runs/export/export-<key>/). Default: the champion when the registry has "
              "one, else the base model (model.spec), which is said on stderr")


@dataclass(frozen=True)
class ModelChoice:
    what: str  # for people: "the champion of 'default' (record 2)", "the base model embedded:gemma3-270m"
    spec: str  # what load_model loads: a preset directory or a model spec
    cache_dir: str | None
    adapter: Path | None
    lora: LoraConfig | None  # how LoRA is enabled before the adapter loads (rank, target layers)
    prompt_format: str
    note: str | None = None  # said on stderr before loading (e.g. why the base model was chosen)


def given_fields(config_path: str | None, overrides: Iterable[str]) -> set[str]:
    """The dotted config fields the user set (``--set`` or the YAML file), as opposed to defaults."""
    fields = {o.partition("=")[0].strip() for o in overrides}
    if config_path:
        try:
            loaded = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError, ValueError):
            loaded = {}  # load_config has already read it; an unreadable file never gets this far
        for section, values in (loaded.items() if isinstance(loaded, dict) else ()):
            fields.update(f"{section}.{name}" for name in (values if isinstance(values, dict) else ()))
    return fields


def choose_model(cfg: PipelineConfig, model: str | None, registry_name: str | None = None,
                 given: set[str] = frozenset()) -> ModelChoice:
    """Resolve ``--model`` (see the module doc); raises CommandError naming the value and the fix."""
    if model is None:
        champion = open_registry(cfg, registry_name).champion()
        if champion is not None and not champion.is_base_model:
            return choose_model(cfg, "champion", registry_name, given)
        why = "nothing promoted yet" if champion is None else f"record {champion.sequence}: {champion.reason}"
        return _base(cfg, note=f"no champion in the registry ({why}): answering with the base model "
                               f"{cfg.model.spec} (--model latest or PATH for a tuned adapter)")
    if model == "base":
        return _base(cfg)
    if model in ("champion", "latest"):
        if read_latest(cfg.output.root) is None:
            raise CommandError(f"--model {model}: no pipeline run under {Path(cfg.output.root).resolve()}: run "
                               "`gemma-lora run` first (or pass its --set output.root=...), or use --model base")
        champion = open_registry(cfg, registry_name).champion() if model == "champion" else None
        if model == "champion" and (champion is None or champion.is_base_model):
            raise CommandError("--model champion: nothing promoted yet, the champion is the base model: use "
                               "--model base, or --model latest for the last run's tuned adapter")
        inputs = export_inputs(cfg, "latest" if model == "latest" else None, registry_name)
        run_config = inputs.config
        if champion is not None:
            run_config = champion.config or run_config
        lora = _lora(cfg, inputs.adapter.lora, inputs.adapter.path, given)
        return ModelChoice(inputs.what, inputs.model.preset_dir, inputs.model.cache_dir, inputs.adapter.path, lora,
                           _trained_format(cfg, _format_of(run_config), inputs.what, given))
    return _adapter_path(cfg, Path(model).expanduser(), model, given)


def _base(cfg: PipelineConfig, note: str | None = None) -> ModelChoice:
    cache_dir = str(cfg.model.cache_dir) if cfg.model.cache_dir else None
    return ModelChoice(f"the base model {cfg.model.spec}", cfg.model.spec, cache_dir, None, None,
                       cfg.data.prompt_format, note)


def _adapter_path(cfg: PipelineConfig, path: Path, given_as: str, given: set[str]) -> ModelChoice:
    from gemma_core.adapter_file import ADAPTER_SUFFIX
    from gemma_core.checkpoints import ADAPTER_FILE

    file = path / ADAPTER_FILE if path.is_dir() else path
    if not (file.is_file() and file.name.endswith(ADAPTER_SUFFIX)):
        found = "a directory without adapter.lora.h5" if path.is_dir() else (
            "a file not ending in .lora.h5" if path.is_file() else "no such file or directory")
        raise CommandError(f"--model {given_as!r}: {found}. Pass {', '.join(MODEL_CHOICES)}, a {ADAPTER_SUFFIX} "
                           "file, or a directory holding adapter.lora.h5 (runs/train/train-<key>/)")
    identity = _training_identity(file)
    latest = read_latest(cfg.output.root) or {}
    run_model = (latest.get("results") or {}).get("model") or {}
    spec, cache_dir = cfg.model.spec, str(cfg.model.cache_dir) if cfg.model.cache_dir else None
    base = f"model.spec {spec}"
    if "model.spec" not in given and run_model.get("preset_dir") and identity.get("model_id") in (
            None, run_model.get("model_hash")):
        spec, cache_dir = run_model["preset_dir"], run_model.get("cache_dir")
        base = f"the last run's {run_model['spec']}"
    recorded = {"rank": identity["lora_rank"], "target_layer_names": identity.get("lora_targets") or None} \
        if "lora_rank" in identity else None
    lora = _lora(cfg, recorded, file, given)
    what = f"adapter {file} on {base}"
    return ModelChoice(what, spec, cache_dir, file, lora,
                       _trained_format(cfg, identity.get("prompt_format"), f"adapter {file}", given))


def _training_identity(file: Path) -> dict[str, Any]:
    """The training identity (model_id, lora_rank, lora_targets, ...) of adapter ``file``: its own manifest's
    (a training's final adapter, an export), else the one its directory's newest checkpoint, or a checkpoint
    directory itself, records; {} where there is none (an adapter copied alone)."""
    from gemma_core.checkpoints import adapter_identity
    from gemma_core.manifest import MANIFEST_FILE, read_manifest

    own = adapter_identity(file)
    if own is not None:
        return own
    directory = file.parent
    candidates = [directory, *sorted((directory / "checkpoints").glob("step-*"), reverse=True)]
    for candidate in candidates:
        if (candidate / MANIFEST_FILE).is_file():
            try:
                identity = (read_manifest(candidate, MANIFEST_FILE) or {}).get("identity")
            except (OSError, ValueError):
                continue
            if isinstance(identity, dict):
                return identity
    return {}


def _lora(cfg: PipelineConfig, recorded: dict[str, Any] | None, adapter: Path, given: set[str]) -> LoraConfig:
    """The LoRA config the adapter loads with: its recorded one, else its file's rank with the config's
    target layers. An explicit lora.rank that differs from the adapter's is refused."""
    from gemma_core.adapter_file import read_adapter_file

    rank = read_adapter_file(adapter).rank
    if "lora.rank" in given and cfg.lora.rank != rank:
        raise CommandError(f"lora.rank={cfg.lora.rank} was given, but adapter {adapter} has rank {rank}: drop "
                           "--set lora.rank (the adapter's own rank is used) or pass an adapter of rank "
                           f"{cfg.lora.rank}")
    if recorded is not None and int(recorded.get("rank", rank)) != rank:
        raise CommandError(f"adapter {adapter} has rank {rank}, but its record says rank {recorded['rank']}: the "
                           "file was replaced; train it again or pass the adapter of that record")
    targets = recorded.get("target_layer_names") if recorded is not None else cfg.lora.target_layer_names
    return LoraConfig(rank=rank, target_layer_names=targets)


def _format_of(run_config: dict[str, Any] | None) -> str:
    # Runs from before data.prompt_format existed were all trained on the instruction template.
    return ((run_config or {}).get("data") or {}).get("prompt_format") or "instruction"


def _trained_format(cfg: PipelineConfig, trained: str | None, what: str, given: set[str]) -> str:
    """The prompt format to ask ``what`` in: the one it was trained in; an explicit other one is refused."""
    from gemma_core.prompts import check_same_prompt_format

    if trained is None:
        return cfg.data.prompt_format
    if "data.prompt_format" in given:
        check_same_prompt_format(trained, cfg.data.prompt_format, what)
    return trained


def load_choice(choice: ModelChoice):
    """The CausalLM for ``choice``: :func:`gemma_core.models.load_model`, then the adapter after checking
    that it fits (rank, layers, shapes: :func:`gemma_core.adapter_file.check_adapter_fits`)."""
    from gemma_core.adapter_file import load_checked_adapter, read_adapter_file
    from gemma_core.models import load_model

    model = load_model(choice.spec, Path(choice.cache_dir) if choice.cache_dir else None, lora=choice.lora)
    if choice.adapter is not None:
        load_checked_adapter(model, read_adapter_file(choice.adapter))
    return model
