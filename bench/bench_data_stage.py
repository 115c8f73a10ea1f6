"""How long the data stage takes on 15,011 generated rows shaped like Dolly-15k.

Rows are synthetic (random words) but match Dolly's size: the real file's 15,011 rows, a third with
a context paragraph, mean response length a few hundred characters. Reports the median of 5 cold
runs (fresh output directory each time) and of 5 cached runs. Target: cold under 2 s.

    .venv/bin/python bench/bench_data_stage.py
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from gemma_core.config import DataConfig
from gemma_core.dolly_prepare import format_dolly_to_parquet

CATEGORIES = ["open_qa", "general_qa", "classification", "closed_qa", "brainstorming",
              "information_extraction", "summarization", "creative_writing"]
WITH_CONTEXT = {"closed_qa", "information_extraction", "summarization"}


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(["river", "stone", "light", "model", "city", "tree", "data", "music"]) for _ in range(n))


def write_rows(path: Path, n: int = 15011) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            category = CATEGORIES[i % len(CATEGORIES)]
            context = words(rng, rng.randint(40, 160)) + " [12]" if category in WITH_CONTEXT else ""
            row = {"instruction": f"{i} " + words(rng, rng.randint(5, 20)), "context": context,
                   "response": words(rng, rng.randint(5, 120)), "category": category}
            f.write(json.dumps(row) + "\n")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "dolly_like.jsonl"
        write_rows(source)
        cfg = DataConfig(source=str(source))
        cold, cached = [], []
        for run in range(5):
            out = Path(tmp) / f"out{run}"
            start = time.perf_counter()
            prepared = format_dolly_to_parquet(cfg, out)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            format_dolly_to_parquet(cfg, out)
            cached.append(time.perf_counter() - start)
        size_mb = source.stat().st_size / 1e6
        print(f"rows: {sum(prepared.counts.values())} kept of 15011 ({size_mb:.1f} MB JSONL)")
        print("| run | median s | min s | max s |\n|---|---|---|---|")
        for name, times in (("cold", cold), ("cached", cached)):
            print(f"| {name} | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} |")
        print(f"target cold < 2 s: {'met' if statistics.median(cold) < 2 else 'MISSED'}")


if __name__ == "__main__":
    main()
