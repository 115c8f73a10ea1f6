"""gemma-lora: the command line. Every config field is an option (--set section.field=value) or
comes from a YAML file (--config); the typed config validates both before any work starts.

  gemma-lora run       run the pipeline (cached: a second identical run is all Cached)
  gemma-lora report    print the last run's report (Markdown), or its HTML/JSON, or open it
  gemma-lora export    export the champion's tuned model (adapter, merged Keras preset, safetensors);
                       --run latest: the last run's
  gemma-lora champion  show the champion (the adapter in use), its metrics, lineage and history
  gemma-lora promote   make a run's tuned adapter (or an old champion) the champion, by hand
  gemma-lora rollback  make the previous champion the champion again

Prefect runs embedded (a temporary local server on SQLite under PREFECT_HOME, default ./.prefect)
unless PREFECT_API_URL points to a server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import webbrowser
from pathlib import Path
from typing import Any, NamedTuple

from flows.storage import LATEST
from gemma_core.config import ConfigError, PipelineConfig, load_config
from gemma_core.formatting import format_fixed, truncate


def _config_help() -> str:
    lines = ["config fields (set with --set section.field=value):"]
    for section, info in PipelineConfig.model_fields.items():
        sub = getattr(info.annotation, "model_fields", None)
        if sub is None:
            lines.append(f"  {section} (default {info.default!r}) {info.description or ''}")
            continue
        for name, field in sub.items():
            lines.append(f"  {section}.{name} (default {field.default!r}) {field.description or ''}")
    return "\n".join(lines)


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with config sections")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma-lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run the pipeline", epilog=_config_help(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _config_options(run)
    run.add_argument("--result-storage", metavar="PATH_OR_URL",
                     help="where cached task results persist: a directory or any fsspec URL "
                          "(default: $GEMMA_LORA_RESULT_STORAGE, else <output.root>/prefect-results)")
    report = commands.add_parser("report", help="show the last run's report (found under output.root)")
    _config_options(report)
    report.add_argument("--format", choices=("md", "html", "json", "path"), default="md",
                        help="md: print report.md (default); html/json: print report.html/metrics.json; "
                             "path: print the report directory")
    report.add_argument("--open", action="store_true", help="open report.html in a browser")
    export = commands.add_parser("export", help="export the champion's tuned model (--run latest: the last run's)")
    _config_options(export)
    export.add_argument("--result-storage", metavar="PATH_OR_URL", help="as for run")
    export.add_argument("--run", choices=("latest",), help="export the last run's tuned model instead of the champion")
    export.add_argument("--name", help="registry name (default: default)")
    champion = commands.add_parser("champion", help="show the champion, its metrics, lineage and history")
    _config_options(champion)
    champion.add_argument("--name", help="registry name: one champion per pipeline name (default: default)")
    champion.add_argument("--format", choices=("text", "json"), default="text")
    champion.add_argument("--repair", action="store_true",
                          help="point a missing or damaged champion.json at the newest intact history record")
    promote = commands.add_parser("promote", help="make a run's tuned adapter the champion, by hand")
    _config_options(promote)
    promote.add_argument("run", metavar="RUN",
                         help="`latest` (the last run), the last run's flow run id, or a history record number "
                              "(re-promotes an old champion; `gemma-lora champion` lists them)")
    promote.add_argument("--name", help="registry name (default: default)")
    promote.add_argument("--reason", help="why, for the history (default: promoted by hand)")
    rollback = commands.add_parser("rollback", help="make the previous champion the champion again")
    _config_options(rollback)
    rollback.add_argument("--name", help="registry name (default: default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, ValueError) as err:
        print(f"gemma-lora: {err}", file=sys.stderr)
        return 2
    if args.command == "report":
        return _report(cfg, args)
    if args.command in ("champion", "promote", "rollback"):
        return _registry_command(cfg, args)
    # Prefect reads its settings when first imported: the defaults go in before that.
    from flows.env import apply_defaults

    apply_defaults()
    os.environ["KERAS_BACKEND"] = cfg.backend
    if args.command == "run":
        return _run(cfg, args.result_storage)
    return _export(cfg, args.result_storage, args.run, args.name)


def _run(cfg: PipelineConfig, result_storage: str | None) -> int:
    from flows.prefect_server import PrefectServer

    # Started first, so that the server starts up while the pipeline's modules import.
    local = None if os.environ.get("PREFECT_API_URL") else PrefectServer.temporary()
    from flows.pipeline import gemma_lora_pipeline

    server = _prefect_server()  # a server named in the active Prefect profile counts too
    if local is not None and server:
        local.stop()
    elif local is not None:
        try:
            local.wait_healthy()
        except RuntimeError as err:
            print(f"gemma-lora: {err}", file=sys.stderr)
            return 1
        local.use()
    if server and not _answers(server):
        print(f"gemma-lora: the Prefect server at {server} (PREFECT_API_URL) does not answer: start it "
              "(`prefect server start`) or unset PREFECT_API_URL to run with a temporary local server",
              file=sys.stderr)
        return 1
    started = time.perf_counter()
    try:
        state = gemma_lora_pipeline(config=cfg.model_dump(mode="json"), result_storage=result_storage,
                                    return_state=True)
    except Exception as err:
        if not (server and _lost_connection(err)):
            raise
        print(f"\ngemma-lora: lost the Prefect server at {server} after {time.perf_counter() - started:.0f} s "
              f"({type(err).__name__}: {err}). When it answers again, run the same command: finished stages "
              "are Cached, and training continues from its newest checkpoint.", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    if not state.is_completed():
        print(f"\ngemma-lora: the run failed after {seconds:.0f} s: {state.message}", file=sys.stderr)
        print("Run the same command again to resume: finished stages are Cached, and training continues "
              "from its newest checkpoint.", file=sys.stderr)
        return 1
    summary = state.result()
    print(_summary_text(summary, seconds))
    return 0


def _prefect_server() -> str | None:
    """The API URL of the Prefect server this run talks to; None when Prefect runs embedded."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url).rstrip("/") if url else None


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def _lost_connection(err: BaseException | None) -> bool:
    """Whether ``err`` (or what caused it) is a failure to reach the server, not an error of the run."""
    import httpx

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (httpx.TransportError, ConnectionError)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _summary_text(summary: dict[str, Any], seconds: float) -> str:
    lines = ["", f"gemma-lora: pipeline finished in {seconds:.0f} s", ""]
    timings = summary.get("stage_seconds", {})
    for stage, state in summary["states"].items():
        took = "" if state == "Cached" else f"  {timings.get(stage, 0):7.1f} s"
        lines.append(f"  {stage:<16} {state:<10}{took}")
    base, tuned = summary["base"], summary["tuned"]
    lines += [
        "",
        f"  {'metric':<22} {'base':>9} {'tuned':>9}",
        *[f"  {label:<22} {format_fixed(base.get(key)):>9} {format_fixed(tuned.get(key)):>9}"
          for key, label in (("completion_loss", "held-out loss"), ("rouge_l_f1", "ROUGE-L F1"),
                             ("eos_rate", "end-of-sequence rate"), ("mean_answer_tokens", "answer length"))],
        "",
        f"  {summary['answers_changed']} of {summary['num_prompts']} answers changed",
        f"  report: {Path(summary['report_dir']) / 'report.html'}  (gemma-lora report to print it)",
    ]
    return "\n".join(lines)


def _latest(cfg: PipelineConfig) -> dict[str, Any] | None:
    path = Path(cfg.output.root) / LATEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _report(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    latest = _latest(cfg)
    if latest is None:
        print(f"gemma-lora: no report under {Path(cfg.output.root).resolve()}: run `gemma-lora run` first "
              "(or pass the run's --config/--set output.root=...)", file=sys.stderr)
        return 1
    report_dir = Path(latest["report_dir"])
    files = {"md": report_dir / "report.md", "html": report_dir / "report.html", "json": report_dir / "metrics.json"}
    if args.open:
        webbrowser.open(files["html"].resolve().as_uri())
    if args.format == "path":
        print(report_dir)
        return 0
    path = files[args.format]
    if not path.is_file():
        print(f"gemma-lora: {path} is missing; run `gemma-lora run` again to rebuild it", file=sys.stderr)
        return 1
    print(path.read_text(encoding="utf-8"))
    return 0


class CommandError(Exception):
    """A command cannot do what was asked; the message says why and what to do instead."""


# --- export ----------------------------------------------------------------------------------------

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

    latest = _latest(cfg)
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
    champion = _registry(cfg, name).champion()
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


def _export(cfg: PipelineConfig, result_storage: str | None, run: str | None = None, name: str | None = None) -> int:
    from gemma_core.registry import RegistryError

    try:
        inputs = export_inputs(cfg, run, name)
    except (CommandError, RegistryError, ValueError) as err:
        print(f"gemma-lora: {err}", file=sys.stderr)
        return 1
    from flows.export import export_flow

    print(f"gemma-lora: exporting {inputs.what}", file=sys.stderr)  # stdout: one "name path" line per export
    state = export_flow(
        config=inputs.config,
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

_METRICS = (("completion_loss", "held-out loss"), ("perplexity", "perplexity"), ("rouge_l_f1", "ROUGE-L F1"),
            ("eos_rate", "end-of-sequence rate"), ("mean_answer_tokens", "answer length"))


def _registry(cfg: PipelineConfig, name: str | None):
    """The registry under the config's output.root; ``--name``, else the config's promotion name, else "default"."""
    from gemma_core.registry import DEFAULT_NAME, Registry

    return Registry(cfg.output.root, name or cfg.promotion.registry or DEFAULT_NAME)


def _registry_command(cfg: PipelineConfig, args: argparse.Namespace) -> int:
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
    registry = _registry(cfg, args.name)
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
        known = [key for key, _ in _METRICS]
        lines.append("  metrics at promotion:")
        lines += [f"    {label:<22} {format_fixed(champion.metrics.get(key))}"
                  for key, label in _METRICS if key in champion.metrics]
        lines += [f"    {key:<22} {value}" for key, value in sorted(champion.metrics.items()) if key not in known]
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
    latest = _latest(cfg)
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
    registry = _registry(cfg, args.name)
    token = registry.token()
    fields, what = _promote_fields(cfg, registry, args.run)
    reason = args.reason or f"promoted by hand (gemma-lora promote {args.run})"
    champion = registry.promote(token, **fields, promoted_by="user", reason=reason)
    adapter = "the base model" if champion.is_base_model else f"adapter {champion.adapter_sha256[:12]}"
    print(f"promoted {what}: {adapter} is the champion of {champion.name!r} (record {champion.sequence}); "
          "`gemma-lora champion` shows it, `gemma-lora rollback` undoes it")
    return 0


def _rollback(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    registry = _registry(cfg, args.name)
    champion = registry.rollback(by="user")
    adapter = "the base model" if champion.is_base_model else f"adapter {champion.adapter_sha256[:12]}"
    print(f"rolled back: {adapter} is the champion of {champion.name!r} again (record {champion.sequence}: "
          f"{champion.reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
