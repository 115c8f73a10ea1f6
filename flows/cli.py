"""``gemma-lora``: the command line. Every config field is an option (``--set section.field=value``)
or comes from a YAML file (``--config``); the typed config validates both before any work starts."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from gemma_core.config import ConfigError, PipelineConfig, load_config


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma-lora", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run the pipeline", epilog=_config_help(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run.add_argument("--config", help="YAML file with config sections")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "run":
            return _run(cfg)
    except (ConfigError, ValueError) as err:
        print(f"gemma-lora: {err}", file=sys.stderr)
        return 2
    return 0


def _run(cfg: PipelineConfig) -> int:
    from gemma_core.dolly_prepare import format_dolly_to_parquet

    prepared = format_dolly_to_parquet(cfg.data, cfg.output.root / "data")
    print(json.dumps({"train": str(prepared.train_path), "eval": str(prepared.eval_path),
                      "counts": prepared.counts, "dropped": prepared.dropped,
                      "data": "offline sample (not Dolly-15k)" if prepared.is_sample else prepared.source}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
