"""Algorithm 2 end to end on a tiny real-text workdir: learning, resume after SIGKILL, torchrun parity."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import soe_sdk
from soe_sdk.errors import SoeError
from trainer.loop import RunSpec, train
from trainer.optim import lr_at
from trainer.presets import get_preset

from .conftest import domain_documents, make_workdir

TINY = get_preset("tiny").replace(eval_every=10)


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def _cli(*args: str, threads: int = 1) -> list[str]:
    return [sys.executable, "-m", "trainer", "train", *args, "--threads", str(threads)]


def test_tiny_soup_learns_and_packs(tmp_path: Path) -> None:
    work = make_workdir(tmp_path / "work")
    run_dir = train(work, TINY.replace(max_steps=40, lr=5e-3), progress=False)
    losses = _losses(run_dir)
    first, last = losses[1], sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 1.0, (first, last)
    assert (run_dir / "curves.png").stat().st_size > 0
    evals = [json.loads(l)["eval"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert evals[-1]["generic"] < evals[0]["generic"]

    from trainer.pack import pack
    pack(work, tmp_path / "tiny.soe")
    soup = soe_sdk.load(tmp_path / "tiny.soe")
    assert soup.n == TINY.experts and soup.k == 4
    assert soup.metadata["provenance"]["steps"] == 40


def test_neighbourhood_meta_distribution_trains_and_is_recorded(tmp_path: Path) -> None:
    work = make_workdir(tmp_path / "work")  # k = 4 domains
    preset = TINY.replace(max_steps=6, support_size=2, support_choice="neighbours", neighbour_share=1.0)
    run_dir = train(work, preset, progress=False)
    assert len(_losses(run_dir)) == 6
    run = json.loads((run_dir / "run.json").read_text())
    assert run["support_choice"] == "neighbours" and run["neighbour_share"] == 1.0
    from trainer.pack import pack
    pack(work, tmp_path / "n.soe")
    dist = soe_sdk.load(tmp_path / "n.soe").metadata["provenance"]["meta_distribution"]
    assert dist == {"kind": "support", "s": 2, "choice": "neighbours", "neighbour_share": 1.0, "generic_share": 0.0,
                    "domain_groups": None}
    with pytest.raises(SoeError, match="neighbour_share"):  # resuming with another π is refused
        train(work, preset.replace(max_steps=8, neighbour_share=0.5), progress=False)


def test_natural_meta_distribution_trains_and_is_recorded(tmp_path: Path) -> None:
    work = make_workdir(tmp_path / "work")
    run_dir = train(work, TINY.replace(max_steps=4, support_choice="natural"), progress=False)
    assert len(_losses(run_dir)) == 4
    from trainer.pack import pack
    pack(work, tmp_path / "n.soe")
    dist = soe_sdk.load(tmp_path / "n.soe").metadata["provenance"]["meta_distribution"]
    assert dist["choice"] == "natural" and dist["s"] == TINY.support_size
    with pytest.raises(SoeError, match="support_choice"):  # resuming with another π is refused
        train(work, TINY.replace(max_steps=6, support_choice="uniform"), progress=False)


def test_router_freeze_at_stops_the_router_but_not_the_rest(tmp_path: Path) -> None:
    from trainer import checkpoint as ckpt
    work = make_workdir(tmp_path / "work")
    preset = TINY.replace(max_steps=10, router_freeze_at=0.5, checkpoint_every=5)
    run_dir = train(work, preset, progress=False, stop_after=5)
    before, _ = ckpt.load_checkpoint(run_dir / "checkpoints", 5)
    train(work, preset, progress=False)
    after, _ = ckpt.load_checkpoint(run_dir / "checkpoints", 10)
    router = [k for k in before if k.startswith("router.")]
    assert router and all(torch.equal(before[k], after[k]) for k in router)
    assert not torch.equal(before["S"], after["S"]) and not torch.equal(before["E"], after["E"])
    assert json.loads((run_dir / "run.json").read_text())["router_freeze_at"] == 0.5


def test_the_presets_precision_is_used_and_recorded(tmp_path: Path) -> None:
    work = make_workdir(tmp_path / "work")
    run_dir = train(work, TINY.replace(max_steps=4, precision="bf16"), progress=False)
    losses = _losses(run_dir)
    assert len(losses) == 4 and all(np.isfinite(v) for v in losses.values())
    assert json.loads((run_dir / "run.json").read_text())["precision"] == "bf16"
    from trainer.pack import pack
    pack(work, tmp_path / "bf16.soe")
    soup = soe_sdk.load(tmp_path / "bf16.soe")
    assert soup.metadata["provenance"]["optimizer"]["precision"] == "bf16"
    # weights are kept in fp32 under bf16 autocast: the packed model is fp32
    assert all(t.dtype == torch.float32 for t in soup.instantiate(torch.zeros(soup.n)).values())
    fp32_dir = train(work, TINY.replace(max_steps=2), spec=RunSpec(name="fp32"), progress=False)  # CPU default
    assert json.loads((fp32_dir / "run.json").read_text())["precision"] == "fp32"


def test_router_input_scale_and_centring_are_folded_into_the_packed_router(tmp_path: Path) -> None:
    work = make_workdir(tmp_path / "work")
    from trainer.shards import write_token_file
    from trainer.tokenizer import load_tokenizer
    texts, labels = domain_documents(3, seed=2)  # a specialist eval set: domain 0's documents
    write_token_file(load_tokenizer(work / "tokenizer.json"), [t for t, d in zip(texts, labels) if d == 0],
                     work / "eval" / "domain0.bin")
    np.save(work / "eval" / "domain0.h_hard.npy", np.array([0.7, 0.1, 0.1, 0.1]))
    run_dir = train(work, TINY.replace(max_steps=10, router_input_scale=4.0, centre_alpha=True), progress=False)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    sets = set(records[-1]["eval"]) - {"generic"}
    assert sets and set(records[-1]["eval_at_generic_alpha"]) == sets == set(records[-1]["alpha_shift"])
    assert all(v > 0 for v in records[-1]["alpha_shift"].values())

    from trainer.checkpoint import load_checkpoint
    from trainer.pack import pack
    pack(work, tmp_path / "scaled.soe")
    soup = soe_sdk.load(tmp_path / "scaled.soe")
    assert soup.metadata["provenance"]["optimizer"]["router_input_scale"] == 4.0
    trained = load_checkpoint(run_dir / "checkpoints", 10)[0]
    router = {k: v for k, v in trained.items() if k.startswith("router.")}
    h = torch.softmax(torch.randn(soup.k, generator=torch.Generator().manual_seed(0)), 0)
    from soe_sdk.soup import router_forward
    centre = trained["alpha_centre"]
    assert float(centre.abs().max()) > 0
    assert torch.allclose(soup.coefficients(h.numpy()), router_forward(router, 4.0 * h) - centre, atol=1e-5)
    resumed = subprocess.run(_cli(str(work), "--preset", "tiny", "--max-steps", "12"), capture_output=True, text=True)
    assert resumed.returncode != 0 and "--router-input-scale" in resumed.stderr


def test_baseline_generic_is_a_plain_model(tmp_path: Path) -> None:
    work = make_workdir(tmp_path / "work")
    out = subprocess.run(_cli(str(work), "--baseline", "generic", "--max-steps", "6") , capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    packed = subprocess.run([sys.executable, "-m", "trainer", "pack", str(work), "--run", "generic",
                             "--out", str(tmp_path / "g.soe")], capture_output=True, text=True)
    assert packed.returncode == 0, packed.stderr
    soup = soe_sdk.load(tmp_path / "g.soe")
    assert soup.n == 0 and soup.metadata["provenance"]["fixed_h"] is True


def test_model_shape_options_override_the_preset_and_a_resume_must_match(tmp_path: Path) -> None:
    work = make_workdir(tmp_path / "work")
    args = [str(work), "--max-steps", "4", "--d-model", "32", "--n-layers", "1"]
    done = subprocess.run(_cli(*args), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    model = json.loads((work / "runs" / "soup" / "run.json").read_text())["soup_config"]["model"]
    assert (model["d_model"], model["n_layers"], model["d_mlp"], model["n_heads"]) == (32, 1, 128, 1)
    subprocess.run([sys.executable, "-m", "trainer", "pack", str(work), "--out", str(tmp_path / "s.soe")], check=True)
    assert soe_sdk.load(tmp_path / "s.soe").config.model.d_model == 32
    other = subprocess.run(_cli(str(work), "--max-steps", "6", "--d-model", "64"), capture_output=True, text=True)
    assert other.returncode != 0 and "another configuration" in other.stderr
    odd = subprocess.run(_cli(str(work), "--d-model", "100"), capture_output=True, text=True)
    assert odd.returncode != 0 and "not divisible by n_heads=3" in odd.stderr and "Traceback" not in odd.stderr


def test_baselines_train_at_the_baseline_learning_rate(tmp_path: Path) -> None:
    from trainer.loop import baseline_spec
    from trainer.shards import DomainShards

    work = make_workdir(tmp_path / "work")
    preset = TINY.replace(max_steps=3, warmup_steps=1, lr=1e-3, baseline_lr=4e-3)
    generic = train(work, preset, spec=baseline_spec("generic", work, DomainShards.open(work), 2), progress=False)
    soup = train(work, preset, progress=False)
    peak = {run.name: max(json.loads(l)["lr"] for l in (run / "metrics.jsonl").read_text().splitlines()
                          if '"loss"' in l) for run in (generic, soup)}
    assert peak == {"generic": 4e-3, "soup": 1e-3}


def test_min_lr_ratio_sets_where_the_schedule_ends(tmp_path: Path) -> None:
    work = make_workdir(tmp_path / "work")
    done = subprocess.run(_cli(str(work), "--max-steps", "8", "--checkpoint-every", "100", "--lr", "1e-3",
                               "--min-lr-ratio", "0.5"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    run_dir = work / "runs" / "soup"
    lrs = [json.loads(l)["lr"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert TINY.warmup_steps < 7  # the last step is on the cosine, near its floor of 0.5e-3
    assert lrs[-1] == pytest.approx(lr_at(7, lr=1e-3, warmup=TINY.warmup_steps, total=8, min_ratio=0.5))
    assert lrs[-1] < lr_at(7, lr=1e-3, warmup=TINY.warmup_steps, total=8, min_ratio=0.6)
    assert json.loads((run_dir / "run.json").read_text())["min_lr_ratio"] == 0.5


def test_stop_after_pauses_a_run_on_its_full_schedule(tmp_path: Path) -> None:
    work = make_workdir(tmp_path / "work")
    common = ["--max-steps", "8", "--checkpoint-every", "100", "--seed", "1"]
    paused = subprocess.run(_cli(str(work), *common, "--stop-after", "3"), capture_output=True, text=True)
    assert paused.returncode == 0, paused.stderr
    run_dir = work / "runs" / "soup"
    assert sorted(_losses(run_dir)) == [1, 2, 3]
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "3"
    assert not (run_dir / "curves.png").exists()  # the run is not finished
    subprocess.run(_cli(str(work), *common), check=True, capture_output=True)
    assert sorted(_losses(run_dir)) == list(range(1, 9))
    bad = subprocess.run(_cli(str(work), *common, "--stop-after", "0"), capture_output=True, text=True)
    assert bad.returncode != 0 and "--stop-after 0" in bad.stderr


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    common = ["--max-steps", "16", "--checkpoint-every", "4", "--seed", "3"]
    ref_work = make_workdir(tmp_path / "ref")
    subprocess.run(_cli(str(ref_work), *common), check=True, capture_output=True)
    reference = _losses(ref_work / "runs" / "soup")

    work = make_workdir(tmp_path / "killed")
    proc = subprocess.Popen(_cli(str(work), *common), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = work / "runs" / "soup" / "checkpoints" / "LATEST"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and int(latest.read_text()) >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text())
    assert 4 <= killed_at < 16 or killed_at == 16  # a fast machine may have finished
    subprocess.run(_cli(str(work), *common), check=True, capture_output=True)
    resumed = _losses(work / "runs" / "soup")
    assert sorted(resumed) == list(range(1, 17))
    for step in range(killed_at + 1, 17):
        assert resumed[step] == reference[step], step  # bit-exact on CPU


def _final_tensors(work: Path, run: str = "soup") -> dict[str, torch.Tensor]:
    from trainer import checkpoint as ckpt
    from trainer.pack import _full_flat
    ckpt_dir = work / "runs" / run / "checkpoints"
    step = ckpt.latest_step(ckpt_dir)
    rank = 0 if (ckpt_dir / ckpt.checkpoint_name(step, 0)).exists() else None
    state = ckpt.load_checkpoint(ckpt_dir, step, rank=rank)[1]
    return _full_flat(ckpt_dir, step, state)


@pytest.mark.parametrize("sharding", ["ddp", "bank"])
def test_torchrun_two_processes_match_one_process(tmp_path: Path, sharding: str) -> None:
    """Same global batch: ddp splits the micro-batches, bank splits each micro-batch's rows.

    Tolerance: 2e-5 absolute after 3 AdamW steps — the only difference is the order in
    which float32 gradient sums are reduced across ranks.
    """
    steps = ["--max-steps", "3", "--seed", "1", "--lr", "1e-3"]
    single = make_workdir(tmp_path / "single")
    accum = "2" if sharding == "ddp" else "1"
    subprocess.run(_cli(str(single), *steps, "--grad-accum", accum), check=True, capture_output=True)
    multi = make_workdir(tmp_path / "multi")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer", "train", str(multi), *steps, "--grad-accum", "1", "--sharding", sharding, "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = _final_tensors(single), _final_tensors(multi)
    for name in ("S", "E", "router.fc1.weight", "router.fc2.weight"):
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=2e-5, msg=name)
    assert not torch.equal(a["S"], _initial_shared(single))
    from trainer import fused_adamw
    if fused_adamw.available():  # every step after the first took rank 0's Θ as the last update merged it
        records = [json.loads(line) for line in (multi / "runs" / "soup" / "metrics.jsonl").read_text().splitlines()]
        assert [r["merged_ahead"] for r in records if "merged_ahead" in r][-1] == 2


def _initial_shared(work: Path) -> torch.Tensor:
    from soe_sdk.config import RouterConfig, SoupConfig
    from soe_sdk.soup import init_soup
    from soe_sdk.flat import FlatLayout
    config = SoupConfig(TINY.model, RouterConfig(k=4, n=TINY.experts, hidden=TINY.router_hidden))
    return FlatLayout.for_model(config.model).flatten(init_soup(config, 1), "shared.")


def test_centroid_router_and_shared_preconditioner_train_and_pack(tmp_path: Path) -> None:
    """A soup whose φ starts as α = F h from the centroids and whose experts share S's second moment:
    the packed archive's φ is that map (frozen router), the settings are in the provenance, and a
    resume with the other preconditioner is refused."""
    from trainer.pack import pack
    from trainer.router_init import centroid_features
    from trainer.shards import DomainShards

    work = make_workdir(tmp_path / "work")
    preset = TINY.replace(max_steps=8, router_init="centroids", router_init_scale=2.0, router_lr_scale=0.0,
                          expert_preconditioner="shared", centre_expert_gradients=True, expert_init_scale=0.0,
                          router_input_scale=2.0,
                          router_hidden=8, experts=3)
    run_dir = train(work, preset, progress=False)
    losses = _losses(run_dir)
    assert len(losses) == 8 and losses[8] < losses[1]
    pack(work, tmp_path / "kernel.soe")
    soup = soe_sdk.load(tmp_path / "kernel.soe")
    opt = soup.metadata["provenance"]["optimizer"]
    assert opt["router_init"] == "centroids" and opt["expert_preconditioner"] == "shared"
    assert opt["centre_expert_gradients"] is True
    features = centroid_features(np.load(work / "centroids.npy"), DomainShards.open(work).h_generic, 3, 2.0)
    h = np.array([0.4, 0.3, 0.2, 0.1])
    torch.testing.assert_close(soup.coefficients(h), torch.as_tensor(features @ h, dtype=torch.float32),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(SoeError, match="expert_preconditioner"):
        train(work, preset.replace(max_steps=10, expert_preconditioner="own", centre_expert_gradients=False),
              progress=False)


def test_group_router_and_group_draws_train_and_pack(tmp_path: Path) -> None:
    """One expert per group of domains, α = h's mass on each group, batches from one group (or
    h_generic): the packed φ is that map, π's groups and share are in the provenance, and a
    resume with another generic share is refused."""
    from trainer.pack import pack
    from trainer.router_init import domain_groups
    from trainer.shards import DomainShards

    work = make_workdir(tmp_path / "work")  # k = 4 domains
    preset = TINY.replace(max_steps=8, experts=2, router_hidden=4, router_init="groups", router_freeze_at=0.0,
                          support_choice="groups", support_size=1, generic_share=0.5,
                          expert_preconditioner="shared", centre_expert_gradients=True, expert_init_scale=0.0)
    run_dir = train(work, preset, progress=False)
    losses = _losses(run_dir)
    assert len(losses) == 8 and losses[8] < losses[1]
    groups = domain_groups(np.load(work / "centroids.npy"), 2)
    pack(work, tmp_path / "groups.soe")
    soup = soe_sdk.load(tmp_path / "groups.soe")
    dist = soup.metadata["provenance"]["meta_distribution"]
    assert dist["choice"] == "groups" and dist["generic_share"] == 0.5 and dist["domain_groups"] == groups.tolist()
    for h in (np.array([0.4, 0.3, 0.2, 0.1]), DomainShards.open(work).h_generic):
        torch.testing.assert_close(soup.coefficients(h), torch.as_tensor(np.bincount(groups, weights=h, minlength=2),
                                                                         dtype=torch.float32), rtol=1e-4, atol=1e-5)
    with pytest.raises(SoeError, match="generic_share"):
        train(work, preset.replace(max_steps=10, generic_share=0.0), progress=False)


def test_expert_start_at_keeps_the_experts_still_until_then(tmp_path: Path) -> None:
    from trainer import checkpoint as ckpt
    work = make_workdir(tmp_path / "work")
    preset = TINY.replace(max_steps=10, expert_start_at=0.5, checkpoint_every=5)
    run_dir = train(work, preset, progress=False, stop_after=5)
    half, _ = ckpt.load_checkpoint(run_dir / "checkpoints", 5)
    from soe_sdk.config import RouterConfig, SoupConfig
    from trainer.state import SoupState
    fresh = SoupState.fresh(SoupConfig(TINY.model, RouterConfig(k=4, n=TINY.experts, hidden=TINY.router_hidden)), 0,
                            torch.device("cpu"))
    assert torch.equal(half["E"], fresh.experts)  # steps 1–5: the experts have not moved
    assert not torch.equal(half["S"], fresh.shared)
    train(work, preset, progress=False)
    end, _ = ckpt.load_checkpoint(run_dir / "checkpoints", 10)
    assert not torch.equal(end["E"], half["E"])  # from step 6 on they learn
    assert json.loads((run_dir / "run.json").read_text())["expert_start_at"] == 0.5
