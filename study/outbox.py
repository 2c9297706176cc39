"""The driver's MLflow outbox: Tune's event loop hands operations to a thread and never waits on
the tracking server.

The thread applies each trial's operations in the order they came, retrying one that failed for
want of a server (no answer, a 5xx) with a growing pause until it goes through: a server that is
down holds results back, not training. Every operation is idempotent (study/tracking.py), so a
retry after an answer that was lost on its way back writes nothing twice. To a tracking server,
different trials' operations go on a few threads at once, so that its answers overlap; an
embedded store (SQLite) takes one writer, so one thread. The study's end goes after all others.
MLflow's own asynchronous logging (`synchronous=False`) covers log_batch alone, needs the run's
id up front, and drops a batch that fails.
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
MAX_ROUND = 400  # operations taken in one round (a backlog after an outage goes in several)
# threads writing to a tracking server: at 4 a 400-trial study's backlog at its end went from
# 99.9 s to 45.6 s (bench/RESULTS.md)
LANES = 4


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
        """`apply(ops)` writes one operation, or a run of one trial's consecutive `log`
        operations and the `close` that may end it, at once."""
        self.apply, self.uri = apply, uri
        self._queue: queue.Queue = queue.Queue()
        self._refused = 0
        self._progress = time.monotonic()  # when an operation last went through
        self._down_since: float | None = None  # the server's first failure to answer, if down
        self._closed = threading.Event()
        self._lanes = LANES if uri.startswith("http") else 1
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
            # A round: the trials' operations up to the study's end, if queued, which goes alone
            # once every operation before it has gone.
            trials: dict = {}
            for op in list(pending)[:MAX_ROUND]:
                if op.trial_id is None:
                    break
                trials.setdefault(op.trial_id, []).append(op)
            groups = list(trials.values()) or [[pending[0]]]
            outcomes = self._apply_round(groups)
            done = {id(op) for ops, (gone, _, _) in zip(groups, outcomes) for op in ops[:gone]}
            pending = deque(op for op in pending if id(op) not in done)
            for _ in done:
                self._queue.task_done()
            self._refused += sum(refused for _, refused, _ in outcomes)
            failures = [e for _, _, e in outcomes if e is not None]
            if failures:  # one failure pauses all: a server that fails one request fails more
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    print(f"mlflow    {self.uri} is not answering ({_first_line(failures[0])}); "
                          "results wait in the driver and go in order once it answers",
                          flush=True)
                pause = min(max(2 * pause, 0.5), MAX_PAUSE_S)
                self._closed.wait(pause)
                continue
            if self._down_since is not None:
                print(f"mlflow    {self.uri} answers again after "
                      f"{time.monotonic() - self._down_since:.0f}s; sending "
                      f"{self._queue.unfinished_tasks} waiting operations", flush=True)
            self._down_since, pause = None, 0.0

    def _apply_round(self, groups: list[list]) -> list[tuple]:
        """The round's groups (one trial's operations each) on up to `self._lanes` threads;
        daemons, as the drain thread: a request hanging on a dead server never holds up the
        driver's exit."""
        if self._lanes == 1:
            return [self._apply_in_order(ops) for ops in groups]
        outcomes, next_one = [None] * len(groups), iter(range(len(groups)))

        def lane():
            for i in next_one:  # each index once: the iterator hands them out under the GIL
                outcomes[i] = self._apply_in_order(groups[i])
        lanes = [threading.Thread(target=lane, name="mlflow-lane", daemon=True)
                 for _ in range(min(self._lanes, len(groups)))]
        for thread in lanes:
            thread.start()
        for thread in lanes:
            thread.join()
        return outcomes

    def _apply_in_order(self, ops: list) -> tuple[int, int, Exception | None]:
        """One trial's operations in order (its consecutive results, and its close if it
        follows them, in one write), until one
        fails for want of a server or the outbox closes: (how many went, of them how many
        MLflow refused, that failure)."""
        gone = refused = 0
        while gone < len(ops) and not self._closed.is_set():
            n = 1  # consecutive results go together, and with them the close that follows
            while (ops[gone + n - 1].kind == "log" and gone + n < len(ops)
                   and ops[gone + n].kind in ("log", "close")):
                n += 1
            try:
                self.apply(ops[gone:gone + n])
            except Exception as e:  # noqa: BLE001  MLflow must never end the study
                if transient(e):
                    return gone, refused, e
                refused += n
                print(f"mlflow    refused {ops[gone].kind} of {ops[gone].trial_id or 'the study'}: "
                      f"{_first_line(e)}", flush=True)
            else:
                self._progress = time.monotonic()
            gone += n
        return gone, refused, None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
