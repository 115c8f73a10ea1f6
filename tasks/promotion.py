"""Stages 7-8: the gate (:mod:`gemma_core.gate`) between the champion and the best challenger, and the
promotion into the registry (:mod:`gemma_core.registry`), mirrored as a Prefect Variable and a keyed
Markdown artifact whose history is the promotion log.

The champion is read anew by every run (:func:`read_champion`, a plain lookup, never cached: another
run may have promoted meanwhile); its evaluation is the ordinary, content-keyed evaluation task, so the champion of
an unchanged rerun is the Cached evaluation of its own run's tuned model. The gate is a cached pure
function of the two evaluations; the promotion writes with compare-and-swap on the token read before
the gate, so two runs promoting at once cannot both win.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from gemma_core.atomic import atomic_write_text
from gemma_core.config import PromotionConfig
from tasks.caching import input_fingerprint
from tasks.common import CACHED
from tasks.evaluate import read_eval
from tasks.results import AdapterRef, DataResult, EvalResult, FileRef, ModelResult, ReportResult, StageResult, TrainOutput
from tasks.runtime import logger, maybe_fail, peak_rss_mb, timed
from tasks.stages import GATE, PROMOTE

GATE_FILE = "gate.json"
CHAMPION_KEY_PREFIX = "gemma-lora-champion-"  # + registry name: the Variable's name and the artifact's key


class ChampionState(BaseModel):
    """The champion as one run found it: the record (None: the base model), the CAS token, and the
    adapter of the champion it was promoted over (``previous``: a challenger that already is the
    champion is gated against that one again, so an unchanged rerun meets the very same gate)."""

    model_config = ConfigDict(frozen=True)

    registry: str
    token: str
    champion: dict[str, Any] | None  # gemma_core.registry.Champion as JSON; None or adapter None: base model
    adapter: AdapterRef | None
    previous: AdapterRef | None

    def opponent(self, challenger_sha256: str | None) -> AdapterRef | None:
        """Whom the challenger meets at the gate: the champion, or, when the challenger is the
        champion's own adapter, the one it replaced (None: the base model)."""
        return self.previous if self.is_champion(challenger_sha256) else self.adapter

    def is_champion(self, adapter_sha256: str | None) -> bool:
        return self.adapter is not None and self.adapter.file.sha256 == adapter_sha256

    @property
    def sequence(self) -> int:
        return int(self.champion["sequence"]) if self.champion else 0


class GateResult(StageResult):
    promote: bool
    reasons: list[str]
    champion_adapter_sha256: str | None
    challenger_adapter_sha256: str


class Promotion(BaseModel):
    """What the run did with the verdict: promoted (the new record's sequence) or why not."""

    promoted: bool
    sequence: int | None = None
    why: str


def read_champion(out_root: str, registry: str, model_hash: str) -> ChampionState:
    """The champion now: read anew by every run, never cached (another run may have promoted meanwhile).
    A champion tuned on another base model than ``model_hash`` cannot be compared: that is an error."""
    from gemma_core.registry import Registry

    reg = Registry(out_root, registry)
    token = reg.token()
    champion = reg.champion()
    if champion is not None and champion.model_hash != model_hash:
        raise ValueError(
            f"the champion of registry {registry!r} was tuned on another base model ({champion.model_spec}, "
            f"model hash {champion.model_hash}; this run's is {model_hash}): set promotion.registry to a new "
            "name for a new base model")
    previous = reg.record(champion.rollback_to) if champion is not None and champion.rollback_to else None
    adapter = _adapter_of(champion)
    who = "the base model" if adapter is None else f"record {champion.sequence} (adapter {adapter.file.sha256[:12]})"
    logger().info("champion of %r: %s", registry, who)
    return ChampionState(registry=registry, token=token, champion=champion.model_dump(mode="json") if champion else None,
                         adapter=adapter, previous=_adapter_of(previous))


def _adapter_of(record) -> AdapterRef | None:
    if record is None or record.is_base_model:
        return None
    # The promoting run's config holds the format the adapter was trained in; a config from before
    # prompt formats existed names none, and the instruction template was the only one then.
    data = record.config.get("data") if isinstance(record.config.get("data"), dict) else None
    prompt_format = data.get("prompt_format", "instruction") if data is not None else None
    return AdapterRef(file=FileRef(path=record.adapter, sha256=record.adapter_sha256), lora=record.lora,
                      prompt_format=prompt_format)


@task(name=GATE, **CACHED)
def gate_challenger(champion: EvalResult, challenger: EvalResult, promotion: PromotionConfig,
                    out_root: str) -> GateResult:
    """Decide with the paired bootstrap whether the challenger replaces the champion; write ``gate.json``."""
    from gemma_core.gate import gate

    maybe_fail(GATE)
    fingerprint = input_fingerprint("gate", {"champion": champion, "challenger": challenger, "promotion": promotion})
    out_dir = Path(out_root) / "gate" / f"gate-{fingerprint[:16]}"
    with timed() as t:
        if challenger.adapter_sha256 == champion.adapter_sha256:
            verdict = None
            reasons = ["the challenger is the champion's own adapter: nothing to promote"]
            document = {"promote": False, "reasons": reasons, "same_adapter": True}
        else:
            verdict = gate(read_eval(champion), read_eval(challenger), promotion)
            reasons = list(verdict.reasons)
            document = verdict.to_dict()
        path = atomic_write_text(out_dir / GATE_FILE, json.dumps(document, indent=1, sort_keys=True) + "\n")
    promote = bool(verdict and verdict.promote)
    logger().info("gate: %s: %s", "promote" if promote else "keep the champion", "; ".join(reasons))
    return GateResult(
        stage=GATE, fingerprint=fingerprint, files={"gate": FileRef.of(path)}, seconds=t.seconds,
        peak_rss_mb=peak_rss_mb(), promote=promote, reasons=reasons,
        champion_adapter_sha256=champion.adapter_sha256, challenger_adapter_sha256=challenger.adapter_sha256 or "",
    )


def read_gate(result: GateResult) -> dict:
    return json.loads(result.path("gate").read_text())


@task(name=PROMOTE, cache_policy=NO_CACHE, persist_result=False)
def promote_challenger(
    found: ChampionState, gate_result: GateResult, train: TrainOutput, challenger: EvalResult,
    model: ModelResult, data: DataResult, report: ReportResult, config: dict[str, Any], run_id: str,
    promoted_by: str = "gate",
) -> Promotion:
    """Record the challenger as the champion, if the champion is still the one the gate compared with."""
    from gemma_core.registry import ChampionChanged, Registry

    maybe_fail(PROMOTE)
    registry = Registry(config["output"]["root"], found.registry)
    try:
        record = registry.promote(
            found.token, adapter=train.path("adapter"), adapter_sha256=train.files["adapter"].sha256,
            lora=train.lora, model_spec=model.spec, model_hash=model.model_hash, data_hash=data.data_hash,
            run_id=run_id, config=config, metrics=challenger.overall, report=str(Path(report.report_dir) / "report.html"),
            promoted_by=promoted_by, reason="; ".join(gate_result.reasons),
        )
    except ChampionChanged as err:
        logger().warning("not promoted: %s", err)
        return Promotion(promoted=False, why=f"the champion changed while this run was gating: {err}")
    logger().info("promoted: adapter %s is the champion of %r (record %d)", record.adapter_sha256[:12],
                  record.name, record.sequence)
    _mirror(record)
    return Promotion(promoted=True, sequence=record.sequence, why=record.reason)


def _mirror(record) -> None:
    """The champion as the Prefect Variable gemma-lora-champion-<name> (what a deployment or another flow
    reads) and a keyed Markdown artifact (its history in the UI is the promotion log)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.variables import Variable

    key = CHAMPION_KEY_PREFIX + record.name
    Variable.set(key, {
        "sequence": record.sequence, "adapter": record.adapter, "adapter_sha256": record.adapter_sha256,
        "lora": record.lora, "model_spec": record.model_spec, "model_hash": record.model_hash,
        "data_hash": record.data_hash, "run_id": record.run_id, "promoted_at": record.promoted_at,
        "metrics": record.metrics,
    }, overwrite=True)
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in (record.metrics or {}).items() if isinstance(v, (int, float)))
    create_markdown_artifact(
        f"# Champion of `{record.name}`: record {record.sequence}\n\n"
        f"- adapter `{record.adapter_sha256}` on `{record.model_spec}` (model {record.model_hash}), "
        f"data {record.data_hash}\n- promoted by {record.promoted_by} at {record.promoted_at}, run {record.run_id}\n"
        f"- why: {record.reason}\n- metrics: {metrics}\n- report: {record.report}\n",
        key=key, description=f"champion record {record.sequence}: {record.promoted_by}",
    )
