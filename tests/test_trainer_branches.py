"""The two-phase recipe (trainer/branches.py): a trunk, one branch per expert, the assembled soup."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import soe_sdk
from soe_sdk.errors import SoeError
from trainer import checkpoint as ckpt
from trainer.branches import branch_steps, group_h, train_branched
from trainer.layout import SoupLayout
from trainer.pack import pack
from trainer.presets import get_preset
from trainer.router_init import domain_groups
from trainer.shards import DomainShards

from .conftest import make_workdir

TINY = get_preset("tiny").replace(eval_every=10, experts=2, router_hidden=4, branch_share=0.5, max_steps=12)


def _final_s(run_dir: Path) -> torch.Tensor:
    return ckpt.load_checkpoint(run_dir / "checkpoints", ckpt.latest_step(run_dir / "checkpoints"))[0]["S"]


def test_branch_steps_split_the_end_of_the_run() -> None:
    assert branch_steps(5500, 0.2, 16) == (4400, [69] * 12 + [68] * 4)
    assert branch_steps(12, 0.5, 2) == (6, [3, 3])
    with pytest.raises(SoeError, match="branch-share"):
        branch_steps(100, 1.0, 2)
    with pytest.raises(SoeError, match="cannot give each"):
        branch_steps(100, 0.01, 4)


def test_group_h_is_the_groups_share_of_the_weights() -> None:
    h = group_h(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4]), 0)
    np.testing.assert_allclose(h, [0.25, 0.0, 0.75, 0.0])
    assert group_h(np.array([0, 0]), np.array([0.5, 0.5]), 1) is None


def test_branched_soup_is_its_trunk_plus_one_branch_per_group(tmp_path: Path) -> None:
    """S is the trunk's final model, E_j = branch j − S, φ(h) = h's mass on each group, so the
    soup instantiated for group j's own mixture is branch j exactly and the generic mixture gives
    the mass-weighted average of the branches; the archive records the recipe."""
    work = make_workdir(tmp_path / "work")
    run_dir = train_branched(work, TINY, name="br", progress=False)
    runs = work / "runs"
    trunk = json.loads((runs / "br-trunk" / "run.json").read_text())
    assert trunk["max_steps"] == 6 and trunk["fixed_h"]
    shared = _final_s(runs / "br-trunk")
    groups = domain_groups(np.load(work / "centroids.npy"), 2)
    branches = {j: _final_s(runs / f"br-branch{j:02d}") for j in range(2)}
    for j, theta in branches.items():
        assert json.loads((runs / f"br-branch{j:02d}" / "run.json").read_text())["max_steps"] == 3
        assert not torch.equal(theta, shared)  # each branch learned from the trunk on

    pack(work, tmp_path / "br.soe", "br")
    soup = soe_sdk.load(tmp_path / "br.soe")
    prov = soup.metadata["provenance"]
    assert prov["steps"] == 12 and prov["optimizer"]["branch_share"] == 0.5
    assert prov["optimizer"]["trunk_steps"] == 6 and prov["optimizer"]["branch_steps"] == [3, 3]
    assert prov["meta_distribution"]["domain_groups"] == groups.tolist()
    flat = SoupLayout.for_soup(soup.config).shared.flatten  # Θ as the trainer's flat vector
    torch.testing.assert_close(flat(soup.instantiate(torch.zeros(2))), shared)  # S is the trunk
    h_generic = DomainShards.open(work).h_generic
    for j, theta in branches.items():
        h = group_h(groups, h_generic, j)
        alpha = soup.coefficients(h)
        torch.testing.assert_close(alpha, torch.eye(2)[j], atol=1e-5, rtol=0)
        torch.testing.assert_close(flat(soup.instantiate(alpha)), theta, atol=1e-5, rtol=1e-5)
    mass = torch.as_tensor(np.bincount(groups, weights=h_generic, minlength=2), dtype=torch.float32)
    average = mass[0] * branches[0] + mass[1] * branches[1]
    torch.testing.assert_close(flat(soup.instantiate(soup.coefficients(h_generic))), average, atol=1e-5, rtol=1e-5)

    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["step"] == 12 and set(final["eval_at_generic_alpha"]) == set(final["eval"]) - {"generic"}


def test_cli_trains_a_branched_soup_and_refuses_a_pause(tmp_path: Path) -> None:
    work = make_workdir(tmp_path / "work")
    base = [sys.executable, "-m", "trainer", "train", str(work), "--preset", "tiny", "--experts", "2",
            "--max-steps", "8", "--branch-share", "0.5", "--branch-lr", "1e-3", "--threads", "1"]
    paused = subprocess.run(base + ["--stop-after", "2"], capture_output=True, text=True)
    assert paused.returncode != 0 and "--stop-after" in paused.stderr
    done = subprocess.run(base, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((work / "runs" / "soup-branch00" / "run.json").read_text())["lr"] == 1e-3
    assert (work / "runs" / "soup" / "metrics.jsonl").exists()
