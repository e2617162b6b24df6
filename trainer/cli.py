"""`soe-train`: prepare a corpus, train a soup or a baseline, pack it into a `.soe` archive."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from soe_sdk.errors import SoeError

from .presets import PRESETS, get_preset


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


def _parse_clusters(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"expected K1xK2 with positive integers (e.g. 4x4), got {value!r}")
    return int(parts[0]), int(parts[1])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Pretrain a Soup-of-Experts (paper Algorithms 1-2) and pack it into one .soe archive.

    \b
    Typical run:
      soe-train prepare --corpus CORPUS --out WORK --preset tiny
      soe-train train WORK --preset tiny
      soe-train pack WORK --out my-soup.soe
    Multi-process / multi-node: torchrun --nproc_per_node=N -m trainer train WORK ...
    """


@main.command()
@click.option("--corpus", required=True, type=click.Path(path_type=Path),
              help="Folder or file of .jsonl/.jsonl.gz (field 'text'), .txt or .parquet documents.")
@click.option("--out", "workdir", required=True, type=click.Path(path_type=Path), help="Work folder to create/reuse.")
@click.option("--preset", default="tiny", type=click.Choice(sorted(PRESETS)), show_default=True)
@click.option("--tokenizer", type=click.Path(exists=True, path_type=Path), help="Use this tokenizer.json instead of training one.")
@click.option("--eval", "eval_path", type=click.Path(exists=True, path_type=Path), help="Generic held-out set (same formats).")
@click.option("--specialist", "specialists", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Folder with train.jsonl.gz and eval.jsonl.gz of one specialist set (repeatable).")
@click.option("--max-docs", type=int, help="Use only the first N documents of the corpus.")
@click.option("--clusters", callback=_parse_clusters,
              help="Domains as K1xK2 (hierarchical k-means, k = K1·K2; K2 = 1 for flat k-means); overrides the preset.")
@click.option("--device", help="Device for the embedder (cpu, cuda).")
def prepare(corpus: Path, workdir: Path, preset: str, tokenizer: Path | None, eval_path: Path | None,
            specialists: tuple[Path, ...], max_docs: int | None, clusters: tuple[int, int] | None,
            device: str | None) -> None:
    """Tokenizer, domains (embed + hierarchical k-means), per-domain token shards, eval sets."""
    from .prepare import prepare as run_prepare
    p = get_preset(preset)
    if clusters:
        p = p.replace(clusters=clusters)
    try:
        summary = run_prepare(corpus, workdir, p, tokenizer_path=tokenizer, eval_path=eval_path,
                              specialist_dirs=specialists, embed_device=device, max_docs=max_docs)
    except SoeError as exc:
        _fail(exc)
    click.echo(f"prepared {workdir}: k={summary.get('k')} domains, {summary.get('tokens', '?')} tokens")


@main.command()
@click.argument("workdir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--preset", default="tiny", type=click.Choice(sorted(PRESETS)), show_default=True)
@click.option("--experts", type=int, help="Number of experts n (0 = a plain model).")
@click.option("--rank", "expert_rank", type=int, help="Low-rank experts of this rank (0 = dense; ddp sharding only).")
@click.option("--max-steps", type=int, help="Total optimizer steps of the run.")
@click.option("--stop-after", type=int,
              help="Pause after this many steps (checkpointed, resumable); the schedule still spans --max-steps. "
                   "For short probes of a long run.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--checkpoint-every", type=int, help="Steps between checkpoints.")
@click.option("--sharding", default="ddp", type=click.Choice(["ddp", "bank"]), show_default=True,
              help="Under torchrun: replicate the soup (ddp) or split the expert bank across ranks (bank).")
@click.option("--baseline", help="Train a baseline instead of a soup: generic, crisp:SET or domain:CLUSTER.")
@click.option("--run-name", "--run", "run_name",
              help="Run name (folder under WORKDIR/runs); default soup or the baseline's name. Under torchrun "
                   "spell it --run-name (torchrun reads --run as an abbreviation of its own --run-path).")
@click.option("--device", help="cpu or cuda (default: cuda if available).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), help="Autocast precision (default: the preset's, else bf16 on GPU and fp32 on CPU).")
@click.option("--lr", type=float, help="Peak learning rate of this run, soup or baseline (overrides the preset).")
@click.option("--min-lr-ratio", type=float,
              help="The cosine schedule ends at lr × this (overrides the preset).")
@click.option("--expert-lr-scale", type=float, help="Experts learn at lr × this (overrides the preset).")
@click.option("--router-lr-scale", type=float, help="The router φ learns at lr × this (overrides the preset).")
@click.option("--expert-weight-decay-scale", type=float,
              help="The experts' weight decay is the preset's × this (overrides the preset).")
@click.option("--router-freeze-at", type=float,
              help="Fraction of the run after which the router φ stops learning (overrides the preset; 1 = never).")
@click.option("--expert-start-at", type=float,
              help="Fraction of the run before which the experts do not learn "
                   "(overrides the preset; 0 = from the start).")
@click.option("--router-input-scale", type=float,
              help="Train φ on c·h (overrides the preset; pack folds c into φ's first layer).")
@click.option("--expert-init-scale", type=float, help="× the dense experts' initial values (0: start at Θ = S).")
@click.option("--router-init", type=click.Choice(["random", "centroids", "groups"]),
              help="φ's initialisation: random, the linear map α = F h from the centroids' principal axes, or "
                   "α_j = h's mass on group j of the domains (one group per expert).")
@click.option("--router-init-scale", type=float, help="With --router-init centroids: RMS ‖α‖ of a single domain; with groups: α of a whole group.")
@click.option("--expert-preconditioner", type=click.Choice(["own", "shared"]),
              help="Experts' Adam second moment: their own, or S's (updates then scale with α).")
@click.option("--expert-moments", type=click.Choice(["float32", "bfloat16"]),
              help="Storage dtype of the expert bank's Adam moments (overrides the preset).")
@click.option("--expert-params", type=click.Choice(["all", "vectors"]),
              help="Parameters that have experts: all, or only the 1-D ones (LayerNorm gains and biases, "
                   "linear biases); the others keep E_j = 0 (overrides the preset).")
@click.option("--expert-beta1", type=float,
              help="With --expert-preconditioner shared: β₁ of the experts' momentum (default: the preset's β₁).")
@click.option("--centre-expert-gradients/--no-centre-expert-gradients", default=None,
              help="With --expert-preconditioner shared: experts learn from ∇Θ minus S's running mean gradient.")
@click.option("--centre-alpha/--no-centre-alpha", default=None,
              help="Merge with α − ᾱ (running mean of α over π) during training (overrides the preset).")
@click.option("--d-model", type=int,
              help="Model width (overrides the preset; d_mlp = 4·d_model, heads of 32 dimensions).")
@click.option("--n-layers", type=int, help="Transformer blocks (overrides the preset).")
@click.option("--batch-size", type=int, help="Sequences per micro-batch (overrides the preset).")
@click.option("--grad-accum", type=int, help="Micro-batches, each with its own h, per optimizer step.")
@click.option("--support-size", type=int, help="s: domains per draw of the meta-distribution.")
@click.option("--support-choice", type=click.Choice(["uniform", "natural", "neighbours", "groups"]),
              help="How π picks its s domains: uniformly, in proportion to h_generic, as neighbourhoods "
                   "(an anchor domain and s − 1 of its 2s nearest) for --neighbour-share of the draws, or as "
                   "s groups of related domains (one group per expert) in proportion to their mass.")
@click.option("--neighbour-share", type=float, help="With --support-choice neighbours: share of neighbourhood draws.")
@click.option("--generic-share", type=float, help="Share of π's draws that are h_generic itself.")
@click.option("--branch-share", type=float,
              help="Fraction of the steps, at the end, in which each expert trains alone from the trunk S on its "
                   "group of domains (overrides the preset; 0 = joint training throughout).")
@click.option("--branch-lr", type=float, help="Peak learning rate of each branch (overrides the preset).")
@click.option("--threads", type=int, help="torch CPU threads.")
def train(workdir: Path, preset: str, experts: int | None, expert_rank: int | None, max_steps: int | None,
          stop_after: int | None, seed: int, checkpoint_every: int | None, sharding: str, baseline: str | None,
          run_name: str | None,
          device: str | None, precision: str | None, lr: float | None, min_lr_ratio: float | None,
          expert_lr_scale: float | None, router_lr_scale: float | None, expert_weight_decay_scale: float | None,
          router_freeze_at: float | None,
          expert_start_at: float | None, router_input_scale: float | None,
          expert_init_scale: float | None,
          router_init: str | None, router_init_scale: float | None, expert_preconditioner: str | None,
          expert_moments: str | None, expert_params: str | None, expert_beta1: float | None,
          centre_expert_gradients: bool | None,
          centre_alpha: bool | None,
          d_model: int | None, n_layers: int | None, batch_size: int | None,
          grad_accum: int | None, support_size: int | None, support_choice: str | None,
          neighbour_share: float | None, generic_share: float | None, branch_share: float | None,
          branch_lr: float | None, threads: int | None) -> None:
    """Train (or resume) a soup or a baseline; resumes from WORKDIR/runs/RUN's last checkpoint."""
    import torch

    from .loop import RunSpec, baseline_spec
    from .loop import train as run_train
    from .shards import DomainShards

    if threads:
        torch.set_num_threads(threads)
    p = get_preset(preset)
    overrides = {k: v for k, v in {"lr": lr, "min_lr_ratio": min_lr_ratio, "expert_lr_scale": expert_lr_scale,
                                   "router_lr_scale": router_lr_scale, "router_freeze_at": router_freeze_at,
                                   "expert_weight_decay_scale": expert_weight_decay_scale,
                                   "expert_start_at": expert_start_at, "router_input_scale": router_input_scale,
                                   "centre_alpha": centre_alpha,
                                   "expert_init_scale": expert_init_scale, "router_init": router_init,
                                   "router_init_scale": router_init_scale,
                                   "expert_preconditioner": expert_preconditioner, "expert_moments": expert_moments,
                                   "expert_params": expert_params,
                                   "expert_beta1": expert_beta1,
                                   "centre_expert_gradients": centre_expert_gradients, "batch_size": batch_size,
                                   "grad_accum": grad_accum,
                                   "support_size": support_size, "support_choice": support_choice,
                                   "neighbour_share": neighbour_share, "generic_share": generic_share,
                                   "expert_rank": expert_rank, "branch_share": branch_share,
                                   "branch_lr": branch_lr}.items() if v is not None}
    if lr is not None:
        overrides["baseline_lr"] = lr
    try:
        if d_model is not None:
            overrides["model"] = dataclasses.replace(p.model, d_model=d_model, d_mlp=4 * d_model,
                                                     n_heads=max(1, d_model // 32))
        if n_layers is not None:
            overrides["model"] = dataclasses.replace(overrides.get("model", p.model), n_layers=n_layers)
    except ValueError as exc:  # the model config's own check, e.g. a width the 32-wide heads do not divide
        hint = " (heads are 32 wide: use a multiple of 32, or a width below 64)" if "n_heads" in str(exc) else ""
        raise click.BadParameter(f"{exc}{hint}", param_hint="--d-model/--n-layers")
    p = p.replace(**overrides)
    try:
        if baseline:
            spec = baseline_spec(baseline, workdir, DomainShards.open(workdir), p.clusters[0])
        else:
            spec = RunSpec("soup", None, experts)
        if run_name:
            spec = RunSpec(run_name, spec.fixed_h, spec.experts)
        if not baseline and p.branch_share > 0:
            from .branches import train_branched
            if stop_after is not None or sharding != "ddp":
                raise SoeError("--branch-share: each phase is a resumable run of its own; drop --stop-after "
                               "and --sharding bank")
            run_dir = train_branched(workdir, p, name=spec.name, max_steps=max_steps, seed=seed, device=device,
                                     precision=precision)
            click.echo(f"run finished: {run_dir}")
            return
        run_dir = run_train(workdir, p, spec=spec, max_steps=max_steps, seed=seed, checkpoint_every=checkpoint_every,
                            device=device, precision=precision, sharding=sharding, stop_after=stop_after)
    except SoeError as exc:
        _fail(exc)
    click.echo(f"run finished: {run_dir}")


@main.command()
@click.argument("workdir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Archive to write (FILE.soe).")
@click.option("--run-name", "--run", "run_name", default="soup", show_default=True, help="Which run to pack.")
def pack(workdir: Path, out: Path, run_name: str) -> None:
    """Pack a run's latest checkpoint, centroids, tokenizer and provenance into one .soe file."""
    from .pack import pack as run_pack
    try:
        digest = run_pack(workdir, out, run_name)
    except SoeError as exc:
        _fail(exc)
    click.echo(f"wrote {out} (sha256 {digest[:16]}…)")


if __name__ == "__main__":
    main()
