"""The driver's outbox on its own: the order it applies operations in, its threads and its
retries, with an `apply` that records what it is given (what MLflow makes of the operations is
tests/test_mlflow_faults.py's subject, against a real server)."""
import threading
import time

from study.outbox import LANES, Outbox
from study.tracking import Op
from studyutil import wait_for


class Recorder:
    """An `apply` that takes `seconds` per call, counts the calls under way at once, and fails
    for want of a server on any op in `failing` until `server_back` is set."""

    def __init__(self, seconds=0.05, failing=()):
        self.seconds, self.failing = seconds, set(map(id, failing))
        self.server_back, self.failures = threading.Event(), 0
        self.calls, self.running, self.most = [], 0, 0
        self._lock = threading.Lock()

    def __call__(self, ops):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.seconds)
            if self.failing & set(map(id, ops)) and not self.server_back.is_set():
                self.failures += 1
                raise ConnectionRefusedError("no server")
            with self._lock:
                self.calls.append([(op.kind, op.trial_id, op.args.get("n")) for op in ops])
        finally:
            with self._lock:
                self.running -= 1


def study_ops(trials=8):
    """Each trial's run opened, three results, closed; the study's end last."""
    ops = []
    for t in range(trials):
        ops += [Op("open", f"t{t}"), *(Op("log", f"t{t}", args={"n": n}) for n in range(3)),
                Op("close", f"t{t}")]
    return ops + [Op("end")]


def drain(uri, recorder, ops) -> int:
    outbox = Outbox(recorder, uri)
    for op in ops:
        outbox.put(op)
    return outbox.close(patience=30)


def per_trial(calls) -> dict:
    """{trial: the (kind, result number) of its operations as applied, in order}"""
    out = {}
    for call in calls:
        for kind, trial, n in call:
            out.setdefault(trial, []).append((kind, n))
    return out


IN_ORDER = [("open", None), ("log", 0), ("log", 1), ("log", 2), ("close", None)]


def test_a_server_gets_several_trials_at_once_each_in_order_and_the_end_last():
    recorder, ops = Recorder(seconds=0.2), study_ops()
    assert drain("http://127.0.0.1:5000", recorder, ops) == 0
    assert LANES > 1 and recorder.most == LANES
    assert recorder.calls[-1] == [("end", None, None)]
    assert per_trial(recorder.calls[:-1]) == {f"t{t}": IN_ORDER for t in range(8)}
    assert len(recorder.calls) < len(ops)  # a trial's queued results went in one write


def test_an_embedded_store_gets_one_writer():
    recorder = Recorder(seconds=0.01)
    assert drain("sqlite:////tmp/mlflow.db", recorder, study_ops()) == 0
    assert recorder.most == 1
    assert per_trial(recorder.calls[:-1]) == {f"t{t}": IN_ORDER for t in range(8)}


def test_a_write_that_fails_goes_again_in_order_while_the_other_trials_go_on():
    ops = study_ops(trials=3)
    second_result_of_t1 = ops[7]
    recorder = Recorder(failing=[second_result_of_t1])
    outbox = Outbox(recorder, "http://127.0.0.1:5000")
    for op in ops:
        outbox.put(op)
    def applied():
        return {op[:2] for call in recorder.calls for op in call}
    wait_for(lambda: {("close", "t0"), ("close", "t2")} <= applied())
    assert recorder.failures >= 1 and ("close", "t1") not in applied()
    assert ("end", None) not in applied()  # waits for t1
    recorder.server_back.set()
    assert outbox.close(patience=30) == 0
    assert per_trial(recorder.calls[:-1]) == {f"t{t}": IN_ORDER for t in range(3)}
    assert recorder.calls[-1] == [("end", None, None)]
    # what waited went in one write: the results of the write that failed, those that came
    # after them, and the close
    assert [("log", "t1", n) for n in range(3)] + [("close", "t1", None)] in recorder.calls
