"""``gemma-lora generate``: answer prompts with the base model, the champion, the last run's adapter or
an adapter path, and write the answers as JSONL.

Prompts come as arguments (``gemma-lora generate "Name a colour." "Name a city."``) or from a JSONL
file in Dolly's schema (``--prompts file.jsonl``: ``instruction``, optional ``context``; every other
field is carried through to the output). Each output line is the input row plus ``answer``,
``ended`` and ``ended_by`` (the stop token, eos or end_of_turn, that ended it before
``generation.max_new_tokens``), ``new_tokens``, ``model`` and ``prompt_format``; to stdout, or to
``--output FILE`` (written to a temp file, then renamed; an existing file is refused unless
``--overwrite``). The sampler and its settings are the config's
``generation.*`` fields (``--set generation.sampler=top_k``); answers are batched by
:func:`gemma_core.generation.generate_answers`, as in evaluation.

This runs plain, not as a Prefect flow: it is a quick command a person waits for, and a flow would
first start a temporary Prefect server (seconds), to track a run that has nothing to cache or
resume and whose answers no later stage reads. The model, the adapter and the prompt format are
found as :mod:`flows.model_choice` says.

    gemma-lora generate "Name a primary colour." --model latest
    gemma-lora generate --prompts held_out.jsonl --output answers.jsonl --set generation.sampler=top_k
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gemma_core.config import PipelineConfig

USAGE_ERROR = 2  # bad input: the message names the value and the fix


class InputError(ValueError):
    """Bad input to generate or chat (a prompts file, an output path, an adapter); exit code 2."""


def add_generate_parser(commands, config_options) -> None:
    from flows.model_choice import MODEL_HELP

    generate = commands.add_parser(
        "generate", help="answer prompts with the base model, the champion, the last run or an adapter (JSONL out)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config_options(generate)
    generate.add_argument("prompt", nargs="*", help="instructions to answer (or use --prompts)")
    generate.add_argument("--prompts", metavar="FILE.jsonl",
                          help="JSONL, one object a line: instruction, optional context, other fields carried through")
    generate.add_argument("--model", help=MODEL_HELP)
    generate.add_argument("--name", help="registry name for champion (default: promotion.registry)")
    generate.add_argument("--output", metavar="FILE.jsonl", help="write the answers here (default: stdout)")
    generate.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def read_prompt_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a prompts JSONL file; a line that is not a JSON object with an ``instruction`` is named.

    Blank lines are skipped; ``context`` may be missing or null (no context).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"--prompts {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--prompts {path}: cannot be read as UTF-8 text ({err})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"--prompts {path} line {number}"
        try:
            row = json.loads(line)
        except ValueError as err:
            raise InputError(f"{where} is not JSON ({err}): the file must be JSONL, one object a line such as "
                             '{"instruction": "Name a colour.", "context": ""}') from None
        if not isinstance(row, dict):
            raise InputError(f"{where} is a JSON {type(row).__name__}, not an object: write it as "
                             '{"instruction": "...", "context": "..."}')
        rows.append(check_prompt_row(row, where))
    if not rows:
        raise InputError(f"--prompts {path} holds no prompts: write one JSON object a line with an instruction")
    return rows


def check_prompt_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        found = "no 'instruction'" if instruction is None else f"instruction {instruction!r}"
        raise InputError(f"{where} has {found}: every prompt needs a non-empty instruction string "
                         f"(fields found: {', '.join(sorted(row)) or 'none'})")
    context = row.get("context")
    if context is not None and not isinstance(context, str):
        raise InputError(f"{where}: context {context!r} must be a string (or left out)")
    return {**row, "context": context or ""}


def check_output(path: str | None, overwrite: bool) -> Path | None:
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise InputError(f"--output {out} is a directory: name a file, e.g. {out / 'answers.jsonl'}")
    if out.exists() and not overwrite:
        raise InputError(f"--output {out} exists: pass --overwrite to replace it, or name another file")
    if not out.parent.is_dir():
        raise InputError(f"--output {out}: the directory {out.parent} does not exist; create it first")
    return out


def generate_command(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from flows.cli_champion import CommandError
    from flows.model_choice import choose_model, given_fields, load_choice
    from gemma_core.registry import RegistryError

    try:
        if args.prompts and args.prompt:
            raise InputError("give prompts as arguments or in --prompts FILE.jsonl, not both")
        if not args.prompts and not args.prompt:
            raise InputError('nothing to answer: give a prompt (gemma-lora generate "Name a colour.") or '
                             "--prompts FILE.jsonl")
        rows = read_prompt_rows(args.prompts) if args.prompts else [
            check_prompt_row({"instruction": text}, f"prompt {i}") for i, text in enumerate(args.prompt, start=1)]
        output = check_output(args.output, args.overwrite)
        choice = choose_model(cfg, args.model, args.name, given_fields(args.config, args.overrides))
        if choice.note:
            print(f"gemma-lora: {choice.note}", file=sys.stderr)
        print(f"gemma-lora: answering {len(rows)} prompt{'s' * (len(rows) != 1)} with {choice.what} "
              f"({choice.prompt_format} format)", file=sys.stderr)
        model = load_choice(choice)
    # Bad input, each named in its message: InputError, AdapterMismatchError, ModelResolutionError,
    # PromptFormatMismatchError and a LoRA config that matches no layer are all ValueErrors.
    except (ValueError, CommandError, RegistryError) as err:
        print(f"gemma-lora: {err}", file=sys.stderr)
        return USAGE_ERROR
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in answer_rows(model, rows, choice, cfg))
    if output is None:
        sys.stdout.write(text)
    else:
        from gemma_core.atomic import atomic_write_text

        atomic_write_text(output, text)
        print(f"gemma-lora: wrote {len(rows)} answers to {output}", file=sys.stderr)
    return 0


def answer_rows(model, rows: list[dict[str, Any]], choice, cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The input rows with their answers (batched generation with the config's sampler)."""
    from gemma_core.generation import generate_answers
    from gemma_core.prompts import format_prompt

    prompts = [format_prompt(row["instruction"], row["context"], choice.prompt_format) for row in rows]
    run = generate_answers(model, prompts, cfg.generation)
    return [{**row, "answer": answer.text, "ended": answer.ended, "ended_by": answer.ended_by,
             "new_tokens": answer.new_tokens, "model": choice.what, "prompt_format": choice.prompt_format}
            for row, answer in zip(rows, run.answers)]
