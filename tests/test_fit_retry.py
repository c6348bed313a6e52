"""launch._fit: a controller that lost an actor mid-poll (a node lost) starts the run again; other
failures, and losses past train.max_failures, are TrainErrors. The real node loss is
tests/test_rehearsal.py; this pins the policy, whose trigger is a race a test cannot schedule."""
import pytest
from ray.exceptions import ActorUnavailableError
from ray.exceptions import ActorDiedError
from ray.train import ControllerError, WorkerGroupError

from runner.spec import TrainSpec
from runner.train import launch


def _trainers(monkeypatch, errors):
    """_trainer returns trainers whose fit() raises the next of `errors` (None: returns "result")."""
    calls = []

    class Fake:
        def fit(self):
            err = errors[len(calls)]
            calls.append(err)
            if err is not None:
                raise err
            return "result"

    monkeypatch.setattr(launch, "_trainer", lambda *a: Fake())
    return calls


def test_a_lost_actor_restarts_the_run(monkeypatch):
    calls = _trainers(monkeypatch, [ControllerError(ActorUnavailableError("socket closed", None)), None])
    assert launch._fit(None, {}, TrainSpec(max_failures=1), "n", "/w", "cell") == "result"
    assert len(calls) == 2


def test_losses_past_max_failures_and_other_errors_fail(monkeypatch):
    lost = ControllerError(ActorUnavailableError("socket closed", None))
    calls = _trainers(monkeypatch, [lost, lost])
    with pytest.raises(launch.TrainError, match="cell: training failed"):
        launch._fit(None, {}, TrainSpec(max_failures=1), "n", "/w", "cell")
    assert len(calls) == 2
    calls = _trainers(monkeypatch, [ControllerError(ValueError("a bug")), None])
    with pytest.raises(launch.TrainError, match="a bug"):
        launch._fit(None, {}, TrainSpec(max_failures=2), "n", "/w", "cell")
    assert len(calls) == 1
    # a worker group that failed past FailureConfig.max_failures: Ray Train has retried it already
    died = WorkerGroupError("worker died", {0: ActorDiedError()})
    died.__cause__ = ActorDiedError()
    calls = _trainers(monkeypatch, [died, None])
    with pytest.raises(launch.TrainError, match="worker died"):
        launch._fit(None, {}, TrainSpec(max_failures=2), "n", "/w", "cell")
    assert len(calls) == 1
