"""The stage names, defined once: task names, task run names, result ``stage`` fields, log keys and the
``GEMMA_LORA_FAIL_AT`` drill all use these. A stage's task run is named exactly its stage name, so
whoever reads runs back from the API (the pipeline reading its training run, the tests, the UI)
matches names, never parses them."""

PREPARE_DATA = "prepare-data"
RESOLVE_MODEL = "resolve-model"
EVALUATE_BASE = "evaluate-base"
TRAIN_LORA = "train-lora"
EVALUATE_TUNED = "evaluate-tuned"
EVALUATE_CHAMPION = "evaluate-champion"
GATE = "gate"
PROMOTE = "promote"
RENDER_REPORT = "render-report"
EXPORT_MODEL = "export-model"

# In the order the pipeline runs them (the export is a flow of its own, after a run). The champion's
# evaluation runs only when there is a champion, and the promotion only when the gate passes.
PIPELINE_STAGES = (PREPARE_DATA, RESOLVE_MODEL, EVALUATE_BASE, TRAIN_LORA, EVALUATE_TUNED, GATE, RENDER_REPORT)


def point_stage(stage: str, label: str) -> str:
    """The stage of one sweep point: ``train-lora[rank=8,lr=0.0005]``; the stage itself without a sweep."""
    return f"{stage}[{label}]" if label else stage
