"""What a long study is doing, in one line every 30 s, and how responsive its driver stayed.

Ray Tune's driver runs one loop: each step takes at most one event (a trial's result, its end, a
new trial), runs every callback on it, and saves the experiment's state. A step that takes long
(a slow callback, a large state to save) holds every other trial's event back, so the longest
step is the driver's worst stall; it is printed when the study ends, beside the longest pause
between steps (time spent outside the loop's steps, in Tune's own reporting).
"""
from __future__ import annotations

import re
import sys
import time

from ray import tune
from ray.tune.experiment import Trial

EVERY_S = 30.0  # between progress lines
# the closing line of the driver's loop (on_experiment_end), for whatever reads it back: the
# longest step, its number, the step count, when it came, the longest pause, trials, seconds
DRIVER_LINE = re.compile(r"driver    longest loop step ([\d.]+) s \(step (\d+) of (\d+), at (\S+)\), "
                         r"longest pause between steps ([\d.]+) s; trials (\d+) in ([\d.]+) s")


class Progress(tune.Callback):
    def setup(self, total_num_samples: int | None = None, **info):
        """Called by Tune as a study starts or resumes, with the trials it plans in all."""
        self.total = total_num_samples or 0
        self.start = self.last_line = time.monotonic()
        # the ETA is drawn from the pace since this driver's first trial started (the cluster's
        # start-up is no part of it): trials ended under this driver per second
        self.first_trial, self.done, self.eta_shown = None, 0, False
        # finished and errored trials by id: those this driver saw end (Tune marks the trials it
        # stops at an interrupt TERMINATED, unfinished as they are), and, on a resumed study,
        # those already ended when it restored them (read at the first step)
        self.ended, self.errored, self.counted_restored = set(), set(), False
        self.steps, self.step_began, self.step_ended = 0, None, None
        self.longest_step, self.longest_step_at, self.longest_step_when = 0.0, 0, 0.0
        self.longest_pause = 0.0

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if not self.counted_restored:
            self.counted_restored = True
            self.ended |= {t.trial_id for t in trials
                           if t.status in (Trial.TERMINATED, Trial.ERROR)}
            self.errored |= {t.trial_id for t in trials if t.status == Trial.ERROR}
        if self.step_ended is not None:
            self.longest_pause = max(self.longest_pause, now - self.step_ended)
        self.step_began = now

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        self.steps += 1
        if now - self.step_began > self.longest_step:
            self.longest_step, self.longest_step_at = now - self.step_began, self.steps
            self.longest_step_when = now - self.start
        self.step_ended = now
        # also as soon as the first trial ends: the first line that can give an ETA
        if now - self.last_line >= EVERY_S or (self.done and not self.eta_shown):
            self.last_line, self.eta_shown = now, self.done > 0
            say(self.line(trials, now))

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.first_trial is None:
            self.first_trial = time.monotonic()

    on_trial_restore = on_trial_start  # a resumed study's unfinished trials

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        self.ended.add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        self.ended.add(trial.trial_id)
        self.errored.add(trial.trial_id)

    def line(self, trials: list, now: float) -> str:
        finished, errored = len(self.ended), len(self.errored)
        running = sum(t.status == Trial.RUNNING and t.trial_id not in self.ended for t in trials)
        pending = max(0, self.total - finished - running)
        elapsed = now - self.start
        if finished >= self.total:
            eta = ""
        elif self.done:
            pace = (now - (self.first_trial or self.start)) / self.done
            eta = f", about {duration(pace * (self.total - finished))} to go"
        else:
            eta = ", no ETA before a trial ends"
        return (f"progress  {finished} of {self.total} trials finished ({errored} errored), "
                f"{running} running, {pending} pending; {duration(elapsed)} elapsed{eta}")

    def on_experiment_end(self, trials, **info):
        now = time.monotonic()
        say(self.line(trials, now))
        say(f"driver    longest loop step {self.longest_step:.2f} s (step "
            f"{self.longest_step_at} of {self.steps}, at {duration(self.longest_step_when)}), "
            f"longest pause between steps "
            f"{self.longest_pause:.2f} s; trials {self.done} in {now - self.start:.1f} s")


def say(line: str) -> None:
    """One line in one write: print() writes the text and its newline apart, and Ray's thread
    that echoes the trials' logs to the driver's stdout could land between them (seen: a
    checkpoint message glued to the end of a progress line)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def duration(seconds: float) -> str:
    """3h05m, 4m12s, 9s."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
