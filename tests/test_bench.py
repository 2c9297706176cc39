"""The GPU check is ready where there is no GPU: it says so and succeeds, and its code runs."""
import os
import subprocess
import sys

import pytest
import torch

from studyutil import REPO, write


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, bench/gpu.sh does the real run")
def test_gpu_check_without_cuda_says_so_and_exits_0():
    r = subprocess.run(["bash", "bench/gpu.sh"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    assert "no CUDA device visible" in r.stdout


def test_budgets_list_the_calibration_and_each_seeds_run_and_count_the_calibration_for_its_seed(
        tiny, tmp_path):
    """bench/speed.py's budgets part, in seconds (no seed recipe), on the tiny synthetic config:
    the calibration is a run of the recipe's own seed; each seed trains once per budget; the time
    to a target is the shortest run reaching it, the calibration included for its seed only."""
    tiny["train"]["seed"] = 1
    config = write(tmp_path, tiny, "tiny.yaml")
    r = subprocess.run([sys.executable, "bench/speed.py", "--part", "budgets", "--seconds",
                        "--budgets", "8", "--seeds", "0", "1", "--config", str(config)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("  seed    budget  epochs     wall   share  val_acc  test_acc\n")[1]
    # seed, budget, epochs, wall, val_acc, test_acc: in seconds there is no share of a seed recipe
    rows = [line.split() for line in out.splitlines() if line[:6].strip().isdigit()]
    assert [row[:2] for row in rows] == [["1", "calib."], ["0", "8s"], ["1", "8s"]]
    assert all(row[6:] in ([], ["over", "its", "budget"]) for row in rows)  # no share column
    assert rows[0][2] == "3" and all(row[3].endswith("s") for row in rows)
    for seed in "01":
        mine = sorted((row for row in rows if row[0] == seed), key=lambda row: float(row[3][:-1]))
        for target, line in [(0.604, "60.4%"), (0.80, "80.0%")]:
            hit = next((row for row in mine if float(row[5]) >= target), None)
            said = next(x for x in out.splitlines() if x.startswith(f"  seed {seed}: {line} test"))
            assert said.endswith(f"reached in {hit[3]} ({hit[2]} epochs)" if hit else
                                 "not reached by any run"), said
    # the tiny model passes 60.4% within three epochs (about 80%), and an 8-s budget trains
    # several times longer: seed 1's time to it is its calibration's
    assert float(rows[0][5]) >= 0.604
    assert next(x for x in out.splitlines() if x.startswith("  seed 1: 60.4% test")).endswith(
        f"reached in {rows[0][3]} (3 epochs)")
