"""`gemma-lora generate` and `gemma-lora chat` on the tiny random Gemma: which model answers (base,
champion, last run, adapter path), JSONL in and out, bad input (exit code 2, no traceback), the
streaming decoder against batched generation, and real terminal sessions in a pseudo-terminal
(streamed answers, Ctrl-C in the middle of one, /reset, /exit, Ctrl-D).

The last run is a latest.json as the pipeline writes it (the fields these commands read), pointing at
the tiny preset and a real adapter whose LoRA factors are seeded non-zero, so the tuned model answers
differently from the base model."""

from __future__ import annotations

import doctest
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from flows.cli_chat import ANSWER, PROMPT, STOPPED
from flows.storage import LATEST
from gemma_core.config import GenerationConfig, LoraConfig
from gemma_core.manifest import write_manifest
from gemma_core.prompts import format_prompt
from tasks.results import FileRef, ModelResult, TrainOutput

REPO = Path(__file__).resolve().parents[1]
MODEL_HASH = "7e57000000000001"
QUESTIONS = ["Name a primary colour.", "What is the capital of France?"]


def seeded_adapter(preset: Path, path: Path, rank: int = 4, seed: int = 1) -> Path:
    """A rank-``rank`` adapter for the tiny model with seeded non-zero factors (B is zero at init)."""
    import keras

    from gemma_core.models import load_model

    model = load_model(str(preset), lora=LoraConfig(rank=rank))
    rng = np.random.default_rng(seed)
    for variable in model.backbone.trainable_variables:
        if "lora_kernel" in variable.path:
            variable.assign(rng.normal(0, 0.5, size=tuple(variable.shape)).astype("float32"))
    path.parent.mkdir(parents=True, exist_ok=True)
    model.backbone.save_lora_weights(str(path))
    del model
    keras.backend.clear_session()
    return path


def write_latest(root: Path, preset: Path, adapter: Path, prompt_format: str = "instruction") -> None:
    """latest.json of a run that tuned ``adapter`` on ``preset`` (the fields generate, chat, promote read)."""
    train_dir = adapter.parent
    (train_dir / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    # The newest checkpoint's identity, as training records it: the model and LoRA the adapter belongs to.
    checkpoint = train_dir / "checkpoints" / "step-00000004"
    checkpoint.mkdir(parents=True, exist_ok=True)
    write_manifest(checkpoint, {
        "step": 4, "identity": {"model_id": MODEL_HASH, "data_hash": "d" * 16, "lora_rank": 4, "lora_targets": []}})
    train = TrainOutput(
        stage="train-lora", fingerprint="f" * 64,
        files={"adapter": FileRef.of(adapter), "log": FileRef.of(train_dir / "train_log.jsonl")},
        seconds=1.0, peak_rss_mb=1.0, out_dir=str(train_dir), steps=4, resumed_from_step=0, final_loss=2.0,
        useful_tokens_per_second=1.0, learning_rate=5e-4, lora={"rank": 4, "target_layer_names": None})
    model = ModelResult(stage="resolve-model", fingerprint="tiny", files={}, seconds=0.1, peak_rss_mb=1.0,
                        spec=str(preset), preset_dir=str(preset), model_hash=MODEL_HASH)
    summary = {
        "flow_run_id": "run-1", "report_dir": str(root / "reports" / "report-0"), "tuned": {"completion_loss": 2.0},
        "results": {"train": train.model_dump(mode="json"), "model": model.model_dump(mode="json"),
                    "data": {"data_hash": "d" * 16}},
        "config": {"model": {"spec": str(preset)}, "data": {"prompt_format": prompt_format}, "lora": {"rank": 4}},
    }
    (root / LATEST).parent.mkdir(parents=True, exist_ok=True)
    (root / LATEST).write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def tuned(tiny_preset, tmp_path_factory):
    """(output root, tiny preset, the last run's adapter): no champion promoted yet."""
    root = tmp_path_factory.mktemp("generate") / "runs"
    adapter = seeded_adapter(tiny_preset, root / "train" / "train-0123456789abcdef" / "adapter.lora.h5")
    write_latest(root, tiny_preset, adapter)
    return root, tiny_preset, adapter


def gemma_lora(root: Path, *args: str, capsys) -> tuple[int, str, str]:
    rc = main([*args, "--set", f"output.root={root}", "--set", "generation.max_new_tokens=8",
               "--set", "generation.batch_size=2"])
    out, err = capsys.readouterr()
    return rc, out, err


def answers_of(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def expected_answers(preset: Path, adapter: Path | None, questions=QUESTIONS, **generation) -> list[str]:
    """The same prompts through load_model and generate_answers directly (what evaluation does)."""
    from gemma_core.generation import generate_answers
    from gemma_core.models import load_model

    model = load_model(str(preset), lora=LoraConfig(rank=4) if adapter else None, adapter=adapter)
    cfg = GenerationConfig(max_new_tokens=8, batch_size=2, **generation)
    return [a.text for a in generate_answers(model, [format_prompt(q) for q in questions], cfg).answers]


# --- generate: which model answers ---------------------------------------------------------------

def test_generate_cli_base_by_default_then_champion_latest_and_adapter_dir(tuned, capsys):
    root, preset, adapter = tuned
    base = expected_answers(preset, None)
    tuned_answers = expected_answers(preset, adapter)
    assert base != tuned_answers, "the seeded adapter must change the answers, or this test shows nothing"

    rc, out, err = gemma_lora(root, "generate", *QUESTIONS, "--set", f"model.spec={preset}", capsys=capsys)
    assert rc == 0, err
    assert "no champion in the registry (nothing promoted yet): answering with the base model" in err
    rows = answers_of(out)
    assert [r["instruction"] for r in rows] == QUESTIONS and [r["answer"] for r in rows] == base
    assert all(r["context"] == "" and r["prompt_format"] == "instruction" and r["new_tokens"] >= 1 for r in rows)

    rc, _, err = gemma_lora(root, "generate", "x", "--model", "champion", capsys=capsys)
    assert rc == 2 and "nothing promoted yet" in err and "--model latest" in err

    assert gemma_lora(root, "promote", "latest", capsys=capsys)[0] == 0
    for model in (None, "champion", "latest", str(adapter.parent), str(adapter)):
        rc, out, err = gemma_lora(root, "generate", *QUESTIONS, *(("--model", model) if model else ()), capsys=capsys)
        assert rc == 0, (model, err)
        assert [r["answer"] for r in answers_of(out)] == tuned_answers, model
    rc, out, err = gemma_lora(root, "generate", "Hi", capsys=capsys)  # the default is now the champion
    assert rc == 0 and "with the champion of 'default' (record 1)" in err and "no champion" not in err
    assert answers_of(out)[0]["model"] == "the champion of 'default' (record 1)"


def test_generate_cli_prompts_file_sampler_and_output_file(tuned, tmp_path, capsys):
    root, preset, adapter = tuned
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"instruction": QUESTIONS[0], "category": "brainstorming", "id": 7},
            {"instruction": "Who wrote it?", "context": "It was written by Ann.", "response": "Ann."}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    output = tmp_path / "answers.jsonl"
    args = ("generate", "--prompts", str(prompts), "--model", "latest", "--output", str(output),
            "--set", "generation.sampler=top_k", "--set", "generation.top_k=50", "--set", "generation.seed=3")
    rc, out, err = gemma_lora(root, *args, capsys=capsys)
    assert rc == 0 and out == "" and f"wrote 2 answers to {output}" in err, err
    written = answers_of(output.read_text())
    for row, answer in zip(rows, written):
        assert {k: answer[k] for k in row} == row  # every input field carried through
    assert written[1]["context"] == "It was written by Ann."
    from gemma_core.generation import generate_answers
    from gemma_core.models import load_model

    model = load_model(str(preset), lora=LoraConfig(rank=4), adapter=adapter)
    cfg = GenerationConfig(max_new_tokens=8, batch_size=2, sampler="top_k", top_k=50, seed=3)
    expected = [a.text for a in generate_answers(
        model, [format_prompt(r["instruction"], r.get("context", "")) for r in rows], cfg).answers]
    assert [a["answer"] for a in written] == expected

    rc, _, err = gemma_lora(root, *args, capsys=capsys)
    assert rc == 2 and f"--output {output} exists: pass --overwrite" in err
    before = output.read_text()
    output.write_text("old")
    rc, _, err = gemma_lora(root, *args, "--overwrite", capsys=capsys)
    assert rc == 0 and output.read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name not in ("prompts.jsonl", "answers.jsonl")]  # no temp left


# --- generate: bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    ('{"instruction": "ok"}\nInstruction: not json\n', "line 2 is not JSON"),
    ('{"instruction": "ok"}\n["a", "list"]\n', "line 2 is a JSON list, not an object"),
    ('{"context": "no question"}\n', "line 1 has no 'instruction'"),
    ('{"instruction": "  "}\n', "line 1 has instruction '  '"),
    ('{"instruction": "ok", "context": 3}\n', "line 1: context 3 must be a string"),
    ("\n\n", "holds no prompts"),
])
def test_generate_cli_refuses_a_bad_prompts_file(tuned, tmp_path, capsys, content, expected):
    root, _, _ = tuned
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    rc, out, err = gemma_lora(root, "generate", "--prompts", str(prompts), capsys=capsys)
    assert rc == 2 and out == "" and expected in err and str(prompts) in err, err


def test_generate_cli_refuses_adapters_of_another_rank_or_base_model(tuned, tmp_path, capsys):
    import keras_hub

    from tests.helpers.tiny_gemma import BACKBONE_CONFIG, VOCABULARY_SIZE

    root, preset, adapter = tuned
    rc, _, err = gemma_lora(root, "generate", "x", "--model", "latest", "--set", "lora.rank=8", capsys=capsys)
    assert rc == 2 and "lora.rank=8 was given, but adapter" in err and "has rank 4" in err

    # Another base model: a Gemma 3 of another width, its adapter of the same rank and layer layout.
    wider = keras_hub.models.Gemma3Backbone(vocabulary_size=VOCABULARY_SIZE, **{**BACKBONE_CONFIG, "hidden_dim": 48})
    wider.enable_lora(rank=4)
    other = tmp_path / "other" / "adapter.lora.h5"
    other.parent.mkdir()
    wider.save_lora_weights(str(other))
    rc, _, err = gemma_lora(root, "generate", "x", "--model", str(other.parent), capsys=capsys)
    assert rc == 2 and "was trained on another base model" in err and "(1, 48, 4)" in err and str(other) in err, err

    for bad, expected in ((tmp_path / "missing", "no such file or directory"),
                          (tmp_path, "a directory without adapter.lora.h5")):
        rc, _, err = gemma_lora(root, "generate", "x", "--model", str(bad), capsys=capsys)
        assert rc == 2 and expected in err and "base, champion, latest" in err
    notes = tmp_path / "notes.lora.h5"
    notes.write_text("not hdf5")
    rc, _, err = gemma_lora(root, "generate", "x", "--model", str(notes), capsys=capsys)
    assert rc == 2 and "is not a keras-hub LoRA adapter" in err

    rc, _, err = gemma_lora(root, "generate", "x", "--model", "latest", "--set", "data.prompt_format=gemma_chat",
                            capsys=capsys)
    assert rc == 2 and "'instruction' prompt format" in err and "gemma_chat" in err, err


def test_generate_cli_bad_input_exits_2_without_a_traceback(tmp_path):
    """The real command in a subprocess: the message, exit code 2, nothing else (no model is loaded)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"instruction": "ok"}\n{oops\n')
    done = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "--prompts", str(prompts),
                           "--set", f"output.root={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "line 2 is not JSON" in done.stderr and "Traceback" not in done.stderr and done.stdout == ""


# --- streaming --------------------------------------------------------------------------------------

def test_generate_cli_streaming_decoder_matches_batched_greedy(tiny_model):
    from gemma_core.generation import generate_answers, make_sampler, stop_token_ids
    from gemma_core.streaming import StreamingDecoder, TextStream, prompt_ids

    cfg = GenerationConfig(max_new_tokens=12, batch_size=2)
    prompts = [format_prompt(q) for q in QUESTIONS]
    batched = generate_answers(tiny_model, prompts, cfg).answers
    tokenizer, stops = tiny_model.preprocessor.tokenizer, stop_token_ids(tiny_model)
    decoder = StreamingDecoder(tiny_model, make_sampler(cfg), stops, cache_length=128)
    for prompt, answer in zip(prompts, batched):
        text = TextStream(tokenizer, stops)
        pieces = [text.push(token) for token in decoder.stream(prompt_ids(tokenizer, prompt), cfg.max_new_tokens)]
        assert len(text.ids) + answer.ended == answer.new_tokens
        assert text.text.strip() == answer.text and "".join(pieces) == text.text
    with pytest.raises(ValueError, match="does not fit in the context of 128 tokens"):
        next(decoder.stream(list(range(120)), 12))


def test_generate_cli_streaming_refuses_what_it_cannot_stream():
    from types import SimpleNamespace

    from gemma_core.generation import make_sampler
    from gemma_core.streaming import StreamingDecoder

    with pytest.raises(ValueError, match="streaming runs a Gemma3CausalLM on the JAX backend; this is "
                                         "SimpleNamespace on 'jax': use --set backend=jax"):
        StreamingDecoder(SimpleNamespace(), make_sampler(GenerationConfig()), (1,), cache_length=64)


def test_generate_cli_chat_history_drops_the_oldest_exchange(tiny_model):
    import gemma_core.chat as chat_module
    from gemma_core.chat import ChatHistory, MessageTooLong
    from gemma_core.streaming import prompt_ids

    assert doctest.testmod(chat_module).failed == 0
    from gemma_core.prompts import chat_prompt

    tokenizer = tiny_model.preprocessor.tokenizer
    count = lambda text: len(prompt_ids(tokenizer, text))  # noqa: E731
    u1, m1, u2 = ("user", "Name a colour."), ("model", "Red is a colour."), ("user", "And another one, please?")
    m2, u3 = ("model", "Blue is one more colour of the sea and the sky."), ("user", "And a third?")
    # A context that holds the second prompt, and the third once the first exchange is dropped, but not all of it.
    budget = max(count(chat_prompt([u1, m1, u2])), count(chat_prompt([u2, m2, u3])))
    assert count(chat_prompt([u1, m1, u2, m2, u3])) > budget
    history = ChatHistory(count, context_tokens=budget + 20, answer_tokens=20)
    prompt, dropped = history.ask(u1[1])
    assert dropped == 0 and prompt == chat_prompt([u1])
    history.answer(m1[1])
    prompt, dropped = history.ask(u2[1])
    assert dropped == 0 and prompt == chat_prompt([u1, m1, u2])
    history.answer(m2[1])
    prompt, dropped = history.ask(u3[1])
    assert dropped == 2 and prompt == chat_prompt([u2, m2, u3]) and count(prompt) <= budget
    with pytest.raises(MessageTooLong, match="shorten it"):
        history.ask("word " * budget)
    assert history.turns[-1] == ("user", "And a third?")  # a refused message leaves the history as it was


# --- real terminal sessions ------------------------------------------------------------------------------

class Terminal:
    """A command in a pseudo-terminal that is its controlling terminal (util-linux ``setsid --ctty``), so
    that Ctrl-C typed into it is the terminal's SIGINT, as in a real shell. Started by subprocess
    (no bare fork of this multithreaded JAX process)."""

    def __init__(self, *args: str):
        self.fd, child_end = os.openpty()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "KERAS_BACKEND": "jax"}
        self.process = subprocess.Popen(["setsid", "--ctty", sys.executable, "-m", "flows.cli", *args], cwd=REPO,
                                        env=env, stdin=child_end, stdout=child_end, stderr=child_end)
        os.close(child_end)
        self.output = ""

    def read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(timeout, 0))
        if not ready:
            return False
        try:
            chunk = os.read(self.fd, 4096).decode("utf-8", errors="replace")
        except OSError:  # EIO: the command has closed the terminal
            return False
        self.output += chunk
        return bool(chunk)

    def expect(self, pattern: str, since: int = 0, timeout: float = 90) -> re.Match:
        """The first match of ``pattern`` in the output after position ``since``, waiting for it."""
        deadline = time.monotonic() + timeout
        while not (match := re.compile(pattern).search(self.output, since)):
            if time.monotonic() > deadline or (not self.read(min(1.0, deadline - time.monotonic()))
                                                and self.process.poll() is not None):
                raise AssertionError(f"{pattern!r} not seen; the terminal shows:\n{self.output[-3000:]}")
        return match

    def send(self, text: str) -> int:
        """Type ``text``; returns the output position before it, for :meth:`expect`'s ``since``."""
        mark = len(self.output)
        os.write(self.fd, text.encode())
        return mark

    def wait(self, timeout: float = 60) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.output[-3000:]}") from None
        while self.read(0.1):
            pass
        os.close(self.fd)
        return code


def interrupt_a_long_answer(term: Terminal, messages: list[str]) -> str:
    """Send messages until an answer streams on long enough to press Ctrl-C in its middle (the tiny
    random model ends some answers at once with a stop token); returns the text shown before it."""
    for message in messages:
        mark = term.send(message + "\r")
        answer_at = term.expect(re.escape(ANSWER), mark).end()
        streamed = term.expect(r"[^\r\n]{12}|" + re.escape(PROMPT), answer_at)
        if streamed.group() == PROMPT:
            continue  # this answer ended by itself
        term.send("\x03")  # Ctrl-C while the answer is being produced
        stopped = term.expect(re.escape(STOPPED.strip()), answer_at)
        term.expect(re.escape(PROMPT), stopped.end())  # the loop asks again
        return term.output[answer_at:stopped.start()]
    raise AssertionError(f"no answer streamed long enough to interrupt:\n{term.output[-3000:]}")


@pytest.mark.slow
def test_generate_cli_chat_streams_stops_on_ctrl_c_resets_and_exits(tuned):
    root, _, _ = tuned
    term = Terminal("chat", "--model", "latest", "--set", f"output.root={root}", "--context-tokens", "4096",
                    "--set", "generation.max_new_tokens=3000")
    term.expect(r"chatting with the last run \(run-1\) \(4096 tokens of context\)")
    term.expect(re.escape(PROMPT))

    messages = ["Name a primary colour.", "And another?", "Why?", "Tell me a long story.", "Go on."]
    shown = interrupt_a_long_answer(term, messages)
    assert len(shown.strip()) >= 12 and "Traceback" not in term.output
    assert term.process.poll() is None, "Ctrl-C in an answer must not end the chat"
    # The loop goes on, the stopped answer kept in the conversation: interrupt another, then /reset.
    interrupt_a_long_answer(term, messages)
    mark = term.send("/reset\r")
    term.expect(re.escape(PROMPT), term.expect(re.escape("(conversation cleared)"), mark).end())
    mark = term.send("/nonsense\r")
    term.expect(re.escape("(unknown command '/nonsense'"), mark)
    term.send("/exit\r")
    assert term.wait() == 0 and "Traceback" not in term.output


@pytest.mark.slow
def test_generate_cli_chat_drops_old_turns_and_leaves_on_ctrl_d(tuned):
    root, _, _ = tuned
    term = Terminal("chat", "--model", "base", "--set", f"output.root={root}", "--set",
                    f"model.spec={tuned[1]}", "--context-tokens", "64", "--set", "generation.max_new_tokens=12")
    term.expect(re.escape(PROMPT))
    dropped = None
    for question in ("Name a colour.", "Name a city.", "Name a river.", "Name a book."):
        mark = term.send(question + "\r")
        term.expect(re.escape(PROMPT), term.expect(re.escape(ANSWER), mark).end())
        dropped = dropped or re.search(r"\(dropped the (\d+) oldest turns to stay within 64 tokens\)",
                                       term.output[mark:])
    assert dropped and int(dropped.group(1)) % 2 == 0, term.output
    term.send("\x04")  # Ctrl-D at the prompt
    assert term.wait() == 0 and "Traceback" not in term.output


@pytest.mark.slow
def test_generate_cli_in_a_terminal_prints_jsonl(tuned):
    root, preset, adapter = tuned
    term = Terminal("generate", QUESTIONS[0], "--model", str(adapter.parent), "--set", f"output.root={root}",
                    "--set", "generation.max_new_tokens=8")
    assert term.wait(timeout=120) == 0, term.output
    line = next(line for line in term.output.splitlines() if line.startswith("{"))
    assert json.loads(line)["answer"] == expected_answers(preset, adapter, QUESTIONS[:1])[0]
