"""gemma-lora: the command line. Every config field is an option (--set section.field=value) or
comes from a YAML file (--config); the typed config validates both before any work starts.

  gemma-lora run       run the pipeline (cached: a second identical run is all Cached)
  gemma-lora report    print the last run's report (Markdown), or its HTML/JSON, or open it
  gemma-lora export    export the champion's tuned model (adapter, merged Keras preset, safetensors);
                       --run latest: the last run's; --format gguf --quant q8_0: a llama.cpp GGUF
                       with an Ollama Modelfile
  gemma-lora champion  show the champion (the adapter in use), its metrics, lineage and history
  gemma-lora promote   make a run's tuned adapter (or an old champion) the champion, by hand
  gemma-lora rollback  make the previous champion the champion again
  gemma-lora generate  answer prompts (arguments or JSONL) with the base model, the champion, the last run
                       or an adapter; JSONL answers
  gemma-lora chat      talk to the model in the terminal, answers streamed as they are produced

Prefect runs embedded (a temporary local server on SQLite under PREFECT_HOME, default ./.prefect)
unless PREFECT_API_URL points to a server.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import webbrowser
from pathlib import Path
from typing import Any

from flows.cli_chat import add_chat_parser, chat_command
from flows.cli_generate import add_generate_parser, generate_command
from flows.cli_champion import add_export_options, export_overrides
from flows.storage import parameter_for_storage, read_latest
from gemma_core.redact import RedactingStream, install_log_redaction
from gemma_core.config import ConfigError, PipelineConfig, load_config
from gemma_core.formatting import format_fixed


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
    parser.add_argument("--verbose", action="store_true",
                        help="also show the native libraries' start-up logging (TensorFlow, XLA, absl; "
                             "or set GEMMA_LORA_VERBOSE=1)")


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
    add_export_options(export)
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
    add_generate_parser(commands, _config_options)
    add_chat_parser(commands, _config_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Nothing the command prints or logs carries a credential inside a URL (a --result-storage URL, a
    # config value): see gemma_core/redact.py.
    install_log_redaction()
    with contextlib.redirect_stdout(RedactingStream(sys.stdout)), contextlib.redirect_stderr(RedactingStream(sys.stderr)):
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from flows.quiet import VERBOSE_ENV, filter_stderr

    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"  # for the processes this one starts, too
    filter_stderr()  # before anything imports Keras, TensorFlow or JAX (flows/quiet.py)
    if args.command == "export":
        args.overrides += export_overrides(args)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, ValueError) as err:
        print(f"gemma-lora: {err}", file=sys.stderr)
        return 2
    if args.command == "report":
        return _report(cfg, args)
    if args.command in ("generate", "chat"):  # plain commands, no Prefect: see flows/cli_generate.py
        os.environ["KERAS_BACKEND"] = cfg.backend
        return (generate_command if args.command == "generate" else chat_command)(cfg, args)
    if args.command in ("champion", "promote", "rollback"):
        from flows.cli_champion import registry_command

        return registry_command(cfg, args)
    # Prefect reads its settings when first imported: the defaults go in before that.
    from flows.env import apply_defaults

    apply_defaults()
    os.environ["KERAS_BACKEND"] = cfg.backend
    # A URL with a credential goes to the flow through the environment, never as a stored flow-run parameter.
    result_storage = parameter_for_storage(args.result_storage)
    if args.command == "run":
        return _run(cfg, result_storage)
    from flows.cli_champion import export

    return export(cfg, result_storage, args.run, args.name)


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
    base, tuned, promotion = summary["base"], summary["tuned"], summary["promotion"]
    lines += [
        "",
        f"  {'metric':<22} {'base':>9} {'tuned':>9}",
        *[f"  {label:<22} {format_fixed(base.get(key)):>9} {format_fixed(tuned.get(key)):>9}"
          for key, label in (("completion_loss", "held-out loss"), ("rouge_l_f1", "ROUGE-L F1"),
                             ("eos_rate", "end-of-sequence rate"), ("mean_answer_tokens", "answer length"))],
        "",
        f"  {summary['answers_changed']} of {summary['num_prompts']} answers changed",
        f"  gate: {'; '.join(summary['gate']['reasons'])}",
        f"  {'promoted: record ' + str(promotion['sequence']) if promotion['promoted'] else 'not promoted: ' + promotion['why']}"
        f"  (gemma-lora champion to show it)",
        f"  report: {Path(summary['report_dir']) / 'report.html'}  (gemma-lora report to print it)",
    ]
    return "\n".join(lines)


def _report(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    latest = read_latest(cfg.output.root)
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



if __name__ == "__main__":
    sys.exit(main())
