"""QA benchmarks as per-run units (runner.stages.qa): which task errors are retried. The kill,
retry and deterministic-failure paths run for real in tests/test_e2e.py."""
import errno

from ray import exceptions as rx

from runner.stages.qa import transient


def _task_error(cause: BaseException) -> BaseException:
    """What ray.get raises for a task that raised `cause`: a RayTaskError that is also a `cause`."""
    return rx.RayTaskError("_run_benchmarks", "Traceback ...", cause).as_instanceof_cause()


def test_lost_workers_nodes_and_io_errors_are_transient():
    assert transient(rx.WorkerCrashedError())
    assert transient(rx.NodeDiedError("node gone"))
    assert transient(_task_error(OSError(errno.EIO, "I/O error on the shared filesystem")))
    assert transient(_task_error(ConnectionResetError("reset by peer")))


def test_errors_of_the_task_itself_are_not_retried():
    from evaluation.benchmarks import BenchmarkError
    assert not transient(_task_error(BenchmarkError("unknown benchmark tasks ['valind_x']")))
    assert not transient(_task_error(FileNotFoundError(errno.ENOENT, "no such file", "qa/x.csv")))
    assert not transient(_task_error(PermissionError(errno.EACCES, "denied")))
    assert not transient(_task_error(ValueError("bad model")))
    assert not transient(_task_error(RuntimeError("CUDA out of memory")))
