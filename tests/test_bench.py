"""The GPU check is ready where there is no GPU: it says so and succeeds, and its code runs."""
import os
import subprocess
import sys

import pytest
import torch

from studyutil import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, bench/gpu.sh does the real run")
def test_gpu_check_without_cuda_says_so_and_exits_0():
    r = subprocess.run(["bash", "bench/gpu.sh"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    assert "no CUDA device visible" in r.stdout
