"""Where a study's start-up goes: runs `python -m study.run ARGS...` and prints each line of its
output with the seconds since the command started (Ray's per-checkpoint lines left out).

    python bench/timeline.py experiments/smoke.yaml --set storage=runs/timeline \
        --set search.num_samples=2 --set train.epochs=1 --set scheduler.type=none
"""
import subprocess
import sys
import time
from pathlib import Path

t0 = time.time()
study = subprocess.Popen([sys.executable, "-m", "study.run", *sys.argv[1:]], text=True,
                         cwd=Path(__file__).resolve().parents[1],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
for line in study.stdout:
    if "Checkpoint successfully created" not in line:
        print(f"{time.time() - t0:7.2f}  {line.rstrip()}", flush=True)
sys.exit(study.wait())
