"""The ``gemma-lora`` commands about the champion (gemma_core/registry.py): ``champion``, ``promote``,
``rollback``, and ``export``, which exports the champion by default and the last run with ``--run latest``.
``champion``, ``promote`` and ``rollback`` import neither Prefect nor Keras, so they answer at once."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from flows.storage import LATEST, read_latest
from gemma_core.config import ExportConfig, PipelineConfig
from gemma_core.formatting import format_fixed, truncate

if TYPE_CHECKING:
    from tasks.results import AdapterRef, ModelResult


class CommandError(Exception):
    """A command cannot do what was asked; the message says why and what to do instead."""


# --- export ----------------------------------------------------------------------------------------

def _choices(field: str) -> tuple[str, ...]:
    from typing import get_args

    return get_args(ExportConfig.model_fields[field].annotation)  # the config's Literal: one list of choices


def add_export_options(parser: argparse.ArgumentParser) -> None:
    """``--format``, ``--quant``, ``--overwrite``: shorthands for ``--set export.<field>=...``."""
    parser.add_argument("--format", choices=_choices("format"),
                        help="keras (default): adapter, merged Keras preset, safetensors; gguf: a merged llama.cpp "
                             "GGUF with an Ollama Modelfile and a README (export.format)")
    parser.add_argument("--quant", choices=_choices("quant"),
                        help="GGUF weight type of the 2-D weights, norms stay f32 (export.quant, default f16)")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="replace a GGUF that already exists (export.overwrite)")


def export_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides the export options stand for, applied after any ``--set`` of the user."""
    given = {"format": args.format, "quant": args.quant, "overwrite": args.overwrite}
    return [f"export.{name}={str(value).lower() if isinstance(value, bool) else value}"
            for name, value in given.items() if value is not None]


class ExportInputs(NamedTuple):
    what: str  # for people: "the champion (record 3)" or "the last run (<flow run id>)"
    config: dict[str, Any]
    model: "ModelResult"
    adapter: "AdapterRef"
    result_storage: str | None


def export_inputs(cfg: PipelineConfig, run: str | None = None, name: str | None = None) -> ExportInputs:
    """What ``gemma-lora export`` exports: the champion of registry ``name`` (default), or with
    ``run="latest"`` the last run's tuned adapter. The champion's adapter is the registry's own copy;
    its base model is the last run's resolved model, which must be the one it was tuned on."""
    from tasks.results import AdapterRef, FileRef, ModelResult, TrainOutput

    latest = read_latest(cfg.output.root)
    if latest is None:
        raise CommandError(f"nothing to export under {Path(cfg.output.root).resolve()}: run `gemma-lora run` first")
    try:
        model = ModelResult.model_validate(latest["results"]["model"])
        if run == "latest":
            return ExportInputs(f"the last run ({latest.get('flow_run_id')})", latest["config"], model,
                                TrainOutput.model_validate(latest["results"]["train"]).adapter(),
                                latest.get("result_storage"))
    except (KeyError, TypeError, ValueError) as err:
        raise CommandError(f"{Path(cfg.output.root) / LATEST}: not a pipeline run summary ({err!r:.120}): "
                           "run `gemma-lora run` again to rewrite it") from None
    if run is not None:
        raise CommandError(f"--run {run!r}: export the champion (no --run) or the last run (--run latest)")
    champion = open_registry(cfg, name).champion()
    if champion is None or champion.is_base_model:
        why = "" if champion is None else f" (record {champion.sequence}: {champion.reason})"
        raise CommandError(f"nothing promoted yet{why}: the champion is the base model; run the pipeline "
                           "or use --run latest")
    if champion.model_hash != model.model_hash:
        raise CommandError(
            f"the champion (record {champion.sequence}) was tuned on {champion.model_spec} (model hash "
            f"{champion.model_hash}), the last run resolved {model.spec} (model hash {model.model_hash}): run "
            f"the pipeline with --set model.spec={champion.model_spec} first, or export the last run with --run latest"
        )
    adapter = AdapterRef(file=FileRef(path=champion.adapter, sha256=champion.adapter_sha256), lora=champion.lora)
    return ExportInputs(f"the champion of {champion.name!r} (record {champion.sequence})", latest["config"],
                        model, adapter, latest.get("result_storage"))


def export(cfg: PipelineConfig, result_storage: str | None, run: str | None = None, name: str | None = None) -> int:
    from gemma_core.registry import RegistryError

    try:
        inputs = export_inputs(cfg, run, name)
    except (CommandError, RegistryError, ValueError) as err:
        print(f"gemma-lora: {err}", file=sys.stderr)
        return 1
    from flows.export import export_flow

    print(f"gemma-lora: exporting {inputs.what}", file=sys.stderr)  # stdout: one "name path" line per export
    # The run's config, with this command's export section (the run itself never exported).
    config = {**inputs.config, "export": cfg.export.model_dump(mode="json")}
    state = export_flow(
        config=config,
        model=inputs.model,
        adapter=inputs.adapter,
        result_storage=result_storage or inputs.result_storage,
        return_state=True,
    )
    if not state.is_completed():
        print(f"gemma-lora: export failed: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    for name, path in result.exports.items():
        print(f"{name:<14} {path}")
    return 0


# --- champion, promote, rollback (the registry: gemma_core/registry.py; no Prefect, no Keras) ----------

def open_registry(cfg: PipelineConfig, name: str | None):
    """The registry under the config's output.root; ``--name``, else the config's promotion name, else "default"."""
    from gemma_core.registry import DEFAULT_NAME, Registry

    return Registry(cfg.output.root, name or cfg.promotion.registry or DEFAULT_NAME)


def registry_command(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from gemma_core.registry import RegistryError

    try:
        if args.command == "champion":
            return _champion(cfg, args)
        if args.command == "promote":
            return _promote(cfg, args)
        return _rollback(cfg, args)
    except (CommandError, RegistryError, ValueError) as err:
        print(f"gemma-lora: {err}", file=sys.stderr)
        return 1


def _champion(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    registry = open_registry(cfg, args.name)
    if args.repair:
        repaired = registry.repair()
        print(f"{registry.champion_path} points at "
              f"{'no record (the base model)' if repaired is None else f'record {repaired.sequence}'}")
    champion, history = registry.champion(), registry.history()
    if args.format == "json":
        print(json.dumps({"name": registry.name, "registry": str(registry.dir.resolve()),
                          "champion": champion.model_dump(mode="json") if champion else None,
                          "history": [c.model_dump(mode="json") for c in history]}, indent=1, sort_keys=True))
    else:
        print(champion_text(registry.name, champion, history))
    return 0


def champion_text(name: str, champion, history: list) -> str:
    """What ``gemma-lora champion`` prints: the champion, its lineage and metrics, then the history."""
    if champion is None:
        return "\n".join([f"champion of {name!r}: the base model: nothing promoted yet",
                          "  the pipeline's gate promotes a tuned adapter that beats it; `gemma-lora promote "
                          "latest` promotes the last run's by hand"])
    what = "the base model" if champion.is_base_model else "a tuned adapter"
    lines = [f"champion of {name!r}: {what}, record {champion.sequence}, promoted by {champion.promoted_by} "
             f"at {champion.promoted_at}",
             f"  {'why':<12} {champion.reason}",
             f"  {'run':<12} {champion.run_id or 'n/a'}",
             f"  {'model':<12} {champion.model_spec} (model hash {champion.model_hash})",
             f"  {'data hash':<12} {champion.data_hash or 'n/a'}"]
    if not champion.is_base_model:
        lora = champion.lora or {}
        layers = ", ".join(lora.get("target_layer_names") or ()) or "keras-hub's default (query, value)"
        lines += [f"  {'adapter':<12} {champion.adapter}",
                  f"  {'sha256':<12} {champion.adapter_sha256}",
                  f"  {'lora':<12} rank {lora.get('rank', '?')}, layers {layers}"]
    lines.append(f"  {'report':<12} {champion.report or 'n/a'}")
    if champion.metrics:
        from gemma_core.report import METRICS

        known = list(METRICS)
        lines.append("  metrics at promotion:")
        lines += [f"    {label:<34} {format_fixed(champion.metrics.get(key))}"
                  for key, (label, _) in METRICS.items() if key in champion.metrics]
        lines += [f"    {key:<34} {value}" for key, value in sorted(champion.metrics.items()) if key not in known]
    lines += ["", f"history ({len(history)} record{'s' * (len(history) != 1)}, oldest first):"]
    for record in history:
        adapter = (record.adapter_sha256 or "")[:12] or "base model"
        loss = record.metrics.get("completion_loss") if record.metrics else None
        lines.append(f"  #{record.sequence:<3} {record.promoted_at}  {truncate(record.promoted_by, 18):<18} "
                     f"{adapter:<12}  loss {format_fixed(loss):>7}  run {record.run_id or 'n/a'}  "
                     f"{truncate(record.reason, 80)}")
    return "\n".join(lines)


def _promote_fields(cfg: PipelineConfig, registry, run: str) -> tuple[dict[str, Any], str]:
    """The fields of the record that ``gemma-lora promote RUN`` writes, and what RUN was, for people."""
    latest = read_latest(cfg.output.root)
    latest_id = (latest or {}).get("flow_run_id")
    if run == "latest" or (latest_id and run == latest_id):
        if latest is None:
            raise CommandError(f"RUN 'latest': no run under {Path(cfg.output.root).resolve()} "
                               f"({LATEST} is missing): run `gemma-lora run` first")
        try:
            train, model, data = (latest["results"][k] for k in ("train", "model", "data"))
            fields = dict(
                adapter=train["files"]["adapter"]["path"], adapter_sha256=train["files"]["adapter"]["sha256"],
                lora=train["lora"], model_spec=model["spec"], model_hash=model["model_hash"],
                data_hash=data["data_hash"], run_id=latest_id, config=latest["config"], metrics=latest["tuned"],
                report=str(Path(latest["report_dir"]) / "report.html"),
            )
        except (KeyError, TypeError) as err:
            raise CommandError(f"{Path(cfg.output.root) / LATEST}: not a pipeline run summary (no {err}): "
                               "run `gemma-lora run` again to rewrite it") from None
        return fields, f"the last run ({latest_id})"
    if run.isdigit():
        old = registry.record(int(run))
        if old.is_base_model:
            fields = dict(adapter=None, model_spec=old.model_spec, model_hash=old.model_hash)
        else:
            fields = {k: getattr(old, k) for k in ("adapter", "adapter_sha256", "lora", "model_spec", "model_hash",
                                                    "data_hash", "run_id", "config", "metrics", "report")}
        return fields, f"history record {old.sequence}"
    forms = ["`latest` (the last run)"]
    if latest_id:
        forms.append(f"the last run's flow run id ({latest_id})")
    held = len(registry.history())
    forms.append(f"a history record number (1..{held})" if held else "a history record number (none yet)")
    raise CommandError(f"RUN {run!r} is not a run this command knows: pass {', '.join(forms[:-1])} or {forms[-1]} "
                       "(older runs' summaries are not kept)")


def _promote(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    registry = open_registry(cfg, args.name)
    token = registry.token()
    fields, what = _promote_fields(cfg, registry, args.run)
    reason = args.reason or f"promoted by hand (gemma-lora promote {args.run})"
    champion = registry.promote(token, **fields, promoted_by="user", reason=reason)
    adapter = "the base model" if champion.is_base_model else f"adapter {champion.adapter_sha256[:12]}"
    print(f"promoted {what}: {adapter} is the champion of {champion.name!r} (record {champion.sequence}); "
          "`gemma-lora champion` shows it, `gemma-lora rollback` undoes it")
    return 0


def _rollback(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    registry = open_registry(cfg, args.name)
    champion = registry.rollback(by="user")
    adapter = "the base model" if champion.is_base_model else f"adapter {champion.adapter_sha256[:12]}"
    print(f"rolled back: {adapter} is the champion of {champion.name!r} again (record {champion.sequence}: "
          f"{champion.reason})")
    return 0
