"""Continuous feeding's actor side (runner.engines.stream) over a plain engine that finishes each
request after as many steps as its max_tokens: units come back as they finish, a merging engine
gets one adapter at a time, in the order the units came. The real vLLM engine behind it is
checked by tests/test_vllm_score.py and bench/continuous_feeding.py."""
from evaluation.types import Request
from runner.engines.stream import Stream


class StepEngine:
    """Holds one adapter at a time (like merged weights on CPUs) when `serial_adapters`."""

    def __init__(self, serial_adapters: bool):
        self.serial_adapters, self.merged, self.live, self.loads, self.n = serial_adapters, None, {}, [], 0

    def admits(self, adapter):
        return not self.serial_adapters or adapter == self.merged

    def add(self, requests):
        assert self.admits(requests[0].adapter) or not self.live, "adapter changed under running requests"
        if self.serial_adapters and requests[0].adapter != self.merged:
            self.merged = requests[0].adapter
            self.loads.append(self.merged)
        ids = []
        for r in requests:
            self.n += 1
            self.live[str(self.n)] = [r.max_tokens, f"{r.adapter}:{r.messages[0]['content']}"]
            ids.append(str(self.n))
        return ids

    def step(self):
        for v in self.live.values():
            v[0] -= 1
        done = [(k, v[1]) for k, v in self.live.items() if v[0] <= 0]
        for k, _ in done:
            del self.live[k]
        return done


def _req(text, steps, adapter=None):
    return Request(messages=({"role": "user", "content": text},), max_tokens=steps, adapter=adapter)


def test_units_come_back_as_they_finish_with_their_answers_in_order():
    s = Stream(StepEngine(serial_adapters=False))
    long, short = [_req("a", 9), _req("b", 1)], [_req("c", 2), _req("d", 2)]
    assert s.serve({0: long, 1: short}) == {1: ["None:c", "None:d"]}  # the short unit first
    assert s.serve({2: [_req("e", 1)]}) == {2: ["None:e"]}  # joins the running batch at once
    assert s.serve({}) == {0: ["None:a", "None:b"]}
    assert s.serve({}) == {} and not s.running and not s.outs  # nothing left: returns at once


def test_a_merging_engine_gets_one_adapter_at_a_time_in_the_order_units_came():
    e = StepEngine(serial_adapters=True)
    s = Stream(e)
    got = s.serve({0: [_req("a", 3, "x"), _req("b", 1, "y")], 1: [_req("c", 1, "x")]})
    while len(got) < 2:
        got.update(s.serve({}))
    assert got == {0: ["x:a", "y:b"], 1: ["x:c"]}
    assert e.loads == ["x", "y", "x"]  # unit 0's y-run waits for the x requests, unit 1 for it
