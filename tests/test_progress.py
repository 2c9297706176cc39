"""A study says how far it is while it runs, and how long its driver's loop ever stalled."""
import re
import time

from studyutil import env_without_tracking, experiment, run, write

PROGRESS = re.compile(r"progress  (\d+) of (\d+) trials finished \((\d+) errored\), (\d+) running, "
                      r"(\d+) pending; (?:(\d+)h)?(?:(\d+)m)?(\d+)s elapsed(?:, (.*))?")
DRIVER = re.compile(r"driver    longest loop step ([\d.]+) s \(step (\d+) of (\d+), at \S+\), "
                    r"longest pause between steps ([\d.]+) s; trials (\d+) in ([\d.]+) s")


def test_progress_lines_and_the_longest_loop_step(tmp_path):
    # three 1-epoch trials, 2 at a time, one of them diverging (a NaN loss: errored)
    d = experiment(tmp_path, name="progress", mode="ablation", search=None,
                   scheduler={"type": "none"})
    d["train"].update(epochs=1, grad_clip=0.0)
    d["ablation"] = {"factors": {"train.lr": [0.002, 0.003, 1.0e30]}, "seeds": [0]}
    start = time.monotonic()
    out = run(write(tmp_path, d), env=env_without_tracking())
    wall = time.monotonic() - start

    lines = [m for m in map(PROGRESS.fullmatch, out.splitlines()) if m]
    # every 30 s, as soon as the first trial has ended (the first ETA), and at the study's end
    assert len(lines) >= 2, out[-4000:]
    counts = [tuple(int(x) for x in m.groups()[:5]) for m in lines]
    for finished, total, errored, running, pending in counts:
        assert total == 3 and finished + running + pending == 3 and running <= 2, counts
        assert errored <= finished
    assert [c[0] for c in counts] == sorted(c[0] for c in counts), counts
    for (finished, *_), m in zip(counts[:-1], lines):  # an ETA once a trial has ended
        assert m[9].startswith("about ") if finished else m[9] == "no ETA before a trial ends"
    assert lines[-1][9] is None  # nothing to go
    assert any(1 <= c[0] < 3 for c in counts[:-1]), counts  # printed when the first one ended
    assert counts[-1] == (3, 3, 1, 0, 0), counts
    for m in lines:
        h, mins, s = (int(x or 0) for x in m.groups()[5:8])
        assert 0 <= 3600 * h + 60 * mins + s <= wall + 1, m[0]

    ends = [m for m in map(DRIVER.fullmatch, out.splitlines()) if m]
    assert len(ends) == 1, out[-4000:]
    longest, at, steps, pause, trials, seconds = (float(x) for x in ends[0].groups())
    assert trials == 3 and 0 < seconds < wall
    assert 1 <= at <= steps and steps >= 3  # at least a step per trial's start, result and end
    assert 0 < longest < seconds and 0 <= pause < seconds
