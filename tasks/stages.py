"""The stage names, defined once: task names, task run names, result ``stage`` fields, log keys and the
``GEMMA_LORA_FAIL_AT`` drill all use these. A stage's task run is named exactly its stage name, so
whoever reads runs back from the API (the pipeline reading its training run, the tests, the UI)
matches names, never parses them."""

PREPARE_DATA = "prepare-data"
RESOLVE_MODEL = "resolve-model"
EVALUATE_BASE = "evaluate-base"
TRAIN_LORA = "train-lora"
EVALUATE_TUNED = "evaluate-tuned"
RENDER_REPORT = "render-report"
EXPORT_MODEL = "export-model"

# In the order the pipeline runs them (the export is a flow of its own, after a run).
PIPELINE_STAGES = (PREPARE_DATA, RESOLVE_MODEL, EVALUATE_BASE, TRAIN_LORA, EVALUATE_TUNED, RENDER_REPORT)


def evaluate_stage(which: str) -> str:
    """The evaluation stage of the ``base`` or the ``tuned`` model."""
    stages = {"base": EVALUATE_BASE, "tuned": EVALUATE_TUNED}
    if which not in stages:
        raise ValueError(f"which={which!r}: the evaluated model is 'base' or 'tuned'")
    return stages[which]
