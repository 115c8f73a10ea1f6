"""flows.storage: saving the result-storage block when several runs start at once."""

import httpx
import pytest
from prefect.exceptions import PrefectHTTPStatusError

from flows.storage import _save_block


class Block:
    """Fails its first saves with the given HTTP statuses, then saves."""

    def __init__(self, *statuses):
        self.statuses, self.calls = list(statuses), 0

    def save(self, name, overwrite):
        self.calls += 1
        if self.statuses:
            request = httpx.Request("POST", "http://127.0.0.1/api/block_documents/")
            raise PrefectHTTPStatusError("refused", request=request,
                                         response=httpx.Response(self.statuses.pop(0), request=request))


@pytest.mark.parametrize("status", [500, 409])
def test_a_lost_race_for_the_name_is_saved_again(status):
    block = Block(status)
    _save_block(block, "results")
    assert block.calls == 2


@pytest.mark.parametrize("status", [401, 403, 422])
def test_a_refused_request_fails_at_once(status):
    block = Block(status)
    with pytest.raises(PrefectHTTPStatusError):
        _save_block(block, "results")
    assert block.calls == 1


def test_a_server_that_keeps_failing_fails_after_the_last_attempt():
    block = Block(500, 500, 500)
    with pytest.raises(PrefectHTTPStatusError):
        _save_block(block, "results", attempts=3)
    assert block.calls == 3
