"""Engine actors on one node claim disjoint cores (runner.engines.cores), in plain processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


CLAIM = ("import json, sys, time; from runner.engines.cores import claim_cores; "
         "print(json.dumps(claim_cores(int(sys.argv[1]))), flush=True); time.sleep(60)")


def test_engine_processes_on_one_node_claim_disjoint_cores_until_they_die(tmp_path):
    env = {**os.environ, "VALIND_CORE_LOCKS": str(tmp_path)}
    allowed = sorted(os.sched_getaffinity(0))

    def start(n):
        p = subprocess.Popen([sys.executable, "-c", CLAIM, str(n)], stdout=subprocess.PIPE, text=True, env=env,
                             cwd=ROOT)
        return p, json.loads(p.stdout.readline())

    a, got_a = start(1)
    b, got_b = start(len(allowed))  # asks for every core, gets the ones `a` does not hold
    assert len(got_a) == 1 and sorted(got_a + got_b) == allowed
    c, got_c = start(1)
    assert got_c == []  # nothing left: the engine then runs unbound and says so
    a.kill()
    a.wait()
    c.kill()
    d, got_d = start(1)
    assert got_d == got_a  # a killed process's claim is released by the kernel
    for p in (b, c, d):
        p.kill()
        p.wait()
