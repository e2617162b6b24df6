"""Non-finite numbers stop things early and say where: training, checkpoints, refinement, export."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import soe_sdk
from exporters import export
from soe_sdk.errors import SoeError
from soe_sdk.refine import refine_alpha
from soe_sdk.tokens import windows
from trainer import checkpoint as ckpt

from ..conftest import DOMAIN_TEXTS, make_workdir
from .conftest import subprocess_env


def test_non_finite_loss_stops_training_with_step_domains_and_last_good_checkpoint(tmp_path: Path) -> None:
    """A learning rate of 3000 blows the model up within a couple of steps."""
    work = make_workdir(tmp_path / "work")
    done = subprocess.run([sys.executable, "-m", "trainer", "train", str(work), "--max-steps", "10",
                           "--checkpoint-every", "1", "--lr", "3000", "--threads", "1"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    errors = re.findall(r"error: [^\r\n]*", done.stderr)
    assert len(errors) == 1, done.stderr[-2000:]
    found = re.fullmatch(r"error: non-finite loss (nan|inf|-inf) at step (\d+) \(micro-batch \d+, domains \[[\d, ]+\]\); "
                         r"last good checkpoint: step (\d+) in (.+)", errors[0])
    assert found, errors[0]
    bad_step, good_step, directory = int(found[2]), int(found[3]), Path(found[4])
    assert good_step == bad_step - 1  # a checkpoint every step: the one just before the blow-up
    assert ckpt.latest_step(directory) == good_step
    tensors, _ = ckpt.load_checkpoint(directory, good_step)  # verifies
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())


def test_a_non_finite_state_is_never_checkpointed(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    good = {"S": torch.ones(4), "E": torch.zeros(2, 4)}
    ckpt.save_checkpoint(directory, 1, good, {"optimizer_steps": 1})
    for bad in (float("nan"), float("inf")):
        broken = {"S": torch.tensor([1.0, bad, 0.0, 0.0]), "E": torch.zeros(2, 4)}
        with pytest.raises(SoeError, match=r"step-00000002\.ckpt: not written, tensor 'S' holds NaN or Inf at "
                                           r"step 2; last good checkpoint: step 1"):
            ckpt.save_checkpoint(directory, 2, broken, {"optimizer_steps": 2})
    assert ckpt.latest_step(directory) == 1
    assert sorted(p.name for p in directory.iterdir()) == ["LATEST", "step-00000001.ckpt"]
    assert torch.equal(ckpt.load_checkpoint(directory, 1)[0]["S"], good["S"])


def test_diverging_refinement_falls_back_to_phi_h_and_says_so(tiny_soup_path: Path) -> None:
    soup = soe_sdk.load(tiny_soup_path)
    tok = soup.tokenizer()
    seq = soup.model_config.max_seq_len
    train = windows(tok, DOMAIN_TEXTS["python"] * 3, seq)
    val = windows(tok, DOMAIN_TEXTS["sql"], seq)
    alpha0 = soup.coefficients([1.0, 0.0, 0.0, 0.0])
    alpha, fit = refine_alpha(soup, alpha0, train, val, lr=1e30, max_steps=20)
    assert fit.stopped == "diverged"
    assert fit.steps < 20 and math.isfinite(fit.val_before)
    assert fit.val_after <= fit.val_before and fit.fell_back
    assert torch.equal(alpha, alpha0)  # φ(h) itself: nothing better was seen before the blow-up
    assert torch.isfinite(alpha).all()


def test_non_finite_inputs_are_refused_with_one_line(tiny_soup_path: Path, tmp_path: Path) -> None:
    soup = soe_sdk.load(tiny_soup_path)
    for h in ([float("nan"), 1, 1, 1], [float("inf"), 0, 0, 0], [-1, 1, 1, 1], [0, 0, 0, 0]):
        with pytest.raises(SoeError, match="finite") as info:
            soup.coefficients(h)
        assert "\n" not in str(info.value)
    with pytest.raises(SoeError, match="NaN or infinite"):
        soup.instantiate(torch.tensor([0.0, float("nan"), 0.0]))
    params = soup.instantiate(soup.coefficients(soup.h_generic))
    params["ln_f.weight"] = params["ln_f.weight"].clone()
    params["ln_f.weight"][0] = float("inf")
    out = tmp_path / "exports" / "specialist"
    with pytest.raises(SoeError) as info:
        export(params, soup.model_config, soup.tokenizer_json, out, "safetensors")
    assert "\n" not in str(info.value) and "ln_f.weight" in str(info.value)
    assert not out.parent.exists()  # refused before anything was written
