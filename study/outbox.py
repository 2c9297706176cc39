"""The driver's MLflow outbox: Tune's event loop hands operations to a thread and never waits on
the tracking server.

The thread applies the operations in the order they came, retrying one that failed for want of
a server (no answer, a 5xx) with a growing pause until it goes through: a server that is down
holds results back, not training. Every operation is idempotent (study/tracking.py), so a retry
after an answer that was lost on its way back writes nothing twice. MLflow's own asynchronous
logging (`synchronous=False`) covers log_batch alone, needs the run's id up front, and drops a
batch that fails.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque

# MLflow's client retries a failed request 7 times over about 4 minutes and waits 120 s for an
# answer; the outbox retries every operation itself, so each request fails fast and the outbox
# decides (set for the driver, where not set already)
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
MAX_PAUSE_S = 5.0  # between retries: a server back from a restart is seen within this
MAX_LOGS = 200  # results sent in one round after an outage (one log_batch per trial)


def transient(e: Exception) -> bool:
    """A failure that a retry can cure: no answer (refused, timed out, cut off) or the server's
    own trouble (5xx, 429). A 4xx refusal is final: retrying it would hold the queue forever."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        status = e.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(e, OSError)  # requests' errors are OSErrors


class Outbox:
    def __init__(self, apply, uri: str):
        """`apply(ops)` writes one operation, or a run of consecutive `log` operations at once."""
        self.apply, self.uri = apply, uri
        self._queue: queue.Queue = queue.Queue()
        self._refused = 0
        self._progress = time.monotonic()  # when an operation last went through
        self._down_since: float | None = None  # the server's first failure to answer, if down
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="mlflow-outbox", daemon=True)
        self._thread.start()

    def put(self, op) -> None:
        self._queue.put(op)

    def close(self, patience: float) -> int:
        """Wait until MLflow has every operation, giving up once `patience` seconds of the wait
        pass with none going through (a long backlog to a live server is waited for); the
        number of operations MLflow did not get."""
        start = time.monotonic()
        if self._queue.unfinished_tasks and self._down_since is not None:
            print(f"mlflow    waiting for {self.uri} to take {self._queue.unfinished_tasks} "
                  f"operations, up to {patience:g} s without an answer", flush=True)
        while self._queue.unfinished_tasks and self._thread.is_alive():
            if time.monotonic() - max(start, self._progress) > patience:
                break
            time.sleep(0.1)
        self._closed.set()
        self._thread.join(timeout=1)
        return self._refused + self._queue.unfinished_tasks

    def _drain(self) -> None:
        pending, pause = deque(), 0.0
        while not self._closed.is_set():
            try:  # everything queued so far, waiting only when there is nothing to do
                while True:
                    pending.append(self._queue.get(block=not pending, timeout=0.2))
            except queue.Empty:
                pass
            if not pending:
                continue
            ops = []  # a backlog of results goes at once, one round trip per trial
            for op in pending:
                if op.kind != "log" or len(ops) == MAX_LOGS:
                    break
                ops.append(op)
            ops = ops or [pending[0]]
            try:
                self.apply(ops)
            except Exception as e:  # noqa: BLE001  MLflow must never end the study
                if transient(e):
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        print(f"mlflow    {self.uri} is not answering ({_first_line(e)}); "
                              "results wait in the driver and go in order once it answers",
                              flush=True)
                    pause = min(max(2 * pause, 0.5), MAX_PAUSE_S)
                    self._closed.wait(pause)
                    continue
                self._refused += len(ops)
                print(f"mlflow    refused {ops[0].kind} of {ops[0].trial_id or 'the study'}: "
                      f"{_first_line(e)}", flush=True)
            else:
                self._progress = time.monotonic()
                if self._down_since is not None:
                    print(f"mlflow    {self.uri} answers again after "
                          f"{self._progress - self._down_since:.0f}s; sending "
                          f"{self._queue.unfinished_tasks - len(ops)} waiting operations",
                          flush=True)
                self._down_since, pause = None, 0.0
            for _ in ops:
                pending.popleft()
                self._queue.task_done()


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
