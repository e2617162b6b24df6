"""A rank that dies under torchrun fails the whole job quickly and clearly; the job then resumes.

Fault injection: SOE_TEST_KILL_RANK_AT_STEP=RANK:STEP (trainer/loop.py) makes that rank
os._exit(1) as it starts that step, like a crashed node.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer import checkpoint as ckpt

from ..conftest import make_workdir
from .conftest import subprocess_env

ARGS = ["--max-steps", "8", "--checkpoint-every", "2", "--seed", "5", "--lr", "1e-3"]
FAIL_WITHIN_S = 120  # gloo notices a closed peer at once; the process-group timeout (300 s) is the backstop


def _torchrun(work: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer",
            "train", str(work), *ARGS, "--grad-accum", "1", "--threads", "1"]


def _final(work: Path) -> dict[str, torch.Tensor]:
    directory = work / "runs" / "soup" / "checkpoints"
    return ckpt.load_checkpoint(directory, ckpt.latest_step(directory))[0]


@pytest.mark.slow
def test_dead_rank_fails_the_job_fast_then_it_resumes(tmp_path: Path) -> None:
    work = make_workdir(tmp_path / "work")
    start = time.time()
    died = subprocess.run(_torchrun(work), capture_output=True, text=True, timeout=FAIL_WITHIN_S + 60,
                          env=subprocess_env(SOE_TEST_KILL_RANK_AT_STEP="1:5"))
    elapsed = time.time() - start
    assert died.returncode != 0
    assert elapsed < FAIL_WITHIN_S, elapsed
    assert "SOE_TEST_KILL_RANK_AT_STEP: rank 1 dies at step 5" in died.stderr
    assert re.search(r"Root Cause.*?rank\s*:\s*1 .*?exitcode\s*:\s*1", died.stderr, re.S), died.stderr[-2000:]
    directory = work / "runs" / "soup" / "checkpoints"
    assert ckpt.latest_step(directory) == 4  # step 5 never completed: the last checkpoint is step 4
    ckpt.load_checkpoint(directory, 4)  # and it verifies

    resumed = subprocess.run(_torchrun(work), capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (work / "runs" / "soup" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, 9))

    # Same global batch in one process (grad-accum 2 = the two ranks' micro-batches).
    single = Path(shutil.copytree(work, tmp_path / "single", ignore=shutil.ignore_patterns("runs")))
    subprocess.run([sys.executable, "-m", "trainer", "train", str(single), *ARGS, "--grad-accum", "2",
                    "--threads", "1"], check=True, capture_output=True, env=subprocess_env(), timeout=600)
    a, b = _final(single), _final(work)
    for name in ("S", "E", "router.fc1.weight", "router.fc2.weight"):
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=5e-5, msg=name)
