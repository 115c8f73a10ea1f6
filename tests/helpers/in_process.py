"""The pipeline run in this test process (Prefect embedded), and its stages' final states read back from
the Prefect API, not from the flow's own summary."""

from __future__ import annotations

from tests.helpers.stage_states import stage_states


def run_stage_states(flow_run_id) -> dict[str, str]:
    """Final state of every stage task of a pipeline run (and of its training subflow), from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        ids = [flow_run_id, *(c.id for c in children)]
        return stage_states(client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids))))


def run_pipeline(cfg, storage, monkeypatch=None, fail_at=None):
    from flows.pipeline import gemma_lora_pipeline

    if monkeypatch is not None:
        if fail_at:
            monkeypatch.setenv("GEMMA_LORA_FAIL_AT", fail_at)
        else:
            monkeypatch.delenv("GEMMA_LORA_FAIL_AT", raising=False)
    state = gemma_lora_pipeline(config=cfg, result_storage=storage, return_state=True)
    return state, run_stage_states(state.state_details.flow_run_id)
