"""ResumingTransport against in-process servers that "restart" (a fresh SessionManager, every
session lost) mid-generation: identical output, bounded retries, clear failures."""
from __future__ import annotations

import pytest
import torch

from splitkernels.models import tiny_model
from splitkernels.runtime import (
    InProcessTransport, Limits, ResumingTransport, RetryPolicy, SessionManager, SplitError, Status, split_model,
)
from splitkernels.runtime.protocol import Open
from splitkernels.runtime.resume import ResumeError
from splitkernels.runtime.transport import Exchange, SessionHandle, Transport

FAST = RetryPolicy(attempts=3, initial_s=0.0, max_s=0.0)


class _Flaky(Transport):
    """In-process sessions on ``servers[0]``; at step ``at`` (once) the server "restarts": it is
    replaced by ``servers[1]`` and the step fails with ``status``. ``down`` more opens then fail."""

    def __init__(self, servers: list[SessionManager], at: int, status: Status = Status.UNAVAILABLE,
                 down: int = 0) -> None:
        self.servers, self.at, self.status, self.down = servers, at, status, down
        self.broke = False

    def open(self, request: Open) -> SessionHandle:
        if self.broke and self.down > 0:
            self.down -= 1
            raise SplitError(Status.UNAVAILABLE, "connection refused")
        outer, inner = self, InProcessTransport(self.servers[0]).open(request)

        class Session(SessionHandle):
            session_id, max_seq_len = inner.session_id, inner.max_seq_len

            def step(self, seq: int, frame: bytes) -> Exchange:
                if seq == outer.at and not outer.broke:
                    outer.broke = True
                    outer.servers.pop(0)
                    raise SplitError(outer.status, "the stream broke")
                return inner.step(seq, frame)

            def close(self) -> None:
                try:
                    inner.close()
                except SplitError:
                    pass

        return Session()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=41, num_layers=3, hidden=48)


def _ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 255, (1, n), generator=torch.Generator().manual_seed(seed))


def _managers(sm, count: int) -> list[SessionManager]:
    return [SessionManager(sm.server, Limits(max_seq_len=256), sm.fingerprint) for _ in range(count)]


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "top_p": 0.9, "seed": 3},
                                      {"do_sample": True, "temperature": 0.7, "top_k": 5, "seed": -9}])
@pytest.mark.parametrize("at", [0, 1, 6])
def test_restarted_server_gives_identical_output(model, sampling, at):
    sm = split_model(model, 1)
    ids = _ids(at, 1 + at)
    expected = sm.generate(ids, 9, **sampling)
    flaky = _Flaky(_managers(sm, 2), at, down=2)
    resuming = ResumingTransport(flaky, FAST)
    assert torch.equal(sm.generate(ids, 9, transport=resuming, **sampling), expected)
    assert flaky.broke and resuming.resumes == 1


def test_cancelled_stream_resumes_and_other_errors_do_not(model):
    sm = split_model(model, 1)
    ids = _ids(1, 4)
    resuming = ResumingTransport(_Flaky(_managers(sm, 2), 2, Status.CANCELLED), FAST)
    assert torch.equal(sm.generate(ids, 5, transport=resuming), sm.generate(ids, 5))
    refusing = ResumingTransport(_Flaky(_managers(sm, 2), 2, Status.RESOURCE_EXHAUSTED), FAST)
    with pytest.raises(SplitError) as e:
        sm.generate(ids, 5, transport=refusing)
    assert e.value.status is Status.RESOURCE_EXHAUSTED and refusing.resumes == 0


def test_gives_up_after_the_bounded_retries(model):
    sm = split_model(model, 1)
    resuming = ResumingTransport(_Flaky(_managers(sm, 2), 2, down=10), FAST)
    with pytest.raises(SplitError) as e:
        sm.generate(_ids(2, 3), 5, transport=resuming)
    assert e.value.status is Status.UNAVAILABLE and "gave up after 3 attempts" in e.value.message
    no_retry = ResumingTransport(_Flaky(_managers(sm, 2), 2), RetryPolicy(attempts=0))
    with pytest.raises(SplitError, match="gave up after 0 attempts"):
        sm.generate(_ids(2, 3), 5, transport=no_retry)


def test_a_different_model_after_the_restart_is_detected(model):
    sm = split_model(model, 1)
    other = split_model(tiny_model("llama", seed=42, num_layers=3, hidden=48), 1)
    # The restarted server runs other weights (and does not check fingerprints).
    servers = [SessionManager(sm.server), SessionManager(other.server)]
    resuming = ResumingTransport(_Flaky(servers, 4), FAST)
    with pytest.raises(ResumeError) as e:
        sm.generate(_ids(5, 6), 8, transport=resuming)
    assert e.value.status is Status.FAILED_PRECONDITION and "diverged at step" in e.value.message


def test_policy_and_arguments_are_checked():
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=-1)
    with pytest.raises(ValueError, match="multiplier"):
        RetryPolicy(multiplier=0.5)
    with pytest.raises(TypeError, match="inner"):
        ResumingTransport(object())
    assert list(RetryPolicy(attempts=5, initial_s=1, multiplier=3, max_s=10).delays()) == [1, 3, 9, 10, 10]
