"""Command-line entry points: `soe-info` (inspect an archive) and `soe-export` (docs → specialist)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import SoeError


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


def _unwritable(out: Path) -> str | None:
    """Why the folder `out` could not be created, judged from its nearest existing ancestor."""
    import os
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"no permission to write in {ancestor}"
    return None


def _human(count: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(count) < 1000:
            return f"{count:.1f}{unit}" if unit else f"{int(count)}"
        count /= 1000
    return f"{count:.1f}T"


def _meta_dist(prov: dict) -> str:
    dist = prov.get("meta_distribution")
    if isinstance(dist, dict) and dist.get("s"):
        chosen = {"natural": " (domains ∝ h_generic)",
                  "neighbours": f" (neighbourhoods for {dist.get('neighbour_share')} of the draws)"}.get(
                      str(dist.get("choice")), "")
        return f"h ~ π with support s={dist['s']}{chosen}"
    return "fixed h (a plain model)"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip checking every tensor's SHA-256.")
def info_main(archive: Path, as_json: bool, no_verify: bool) -> None:
    """Summarise a .soe archive (config, n, k, sizes, embedder, provenance) and verify its checksums."""
    from . import fused
    from .soup import load
    try:
        soup = load(archive)
        checked = 0 if no_verify else soup.archive.verify_all()
    except SoeError as exc:
        _fail(exc)
    meta = soup.metadata
    counts = soup.parameter_counts()
    summary = {
        "file": str(archive), "bytes": archive.stat().st_size, "format_version": 1,
        "model": soup.model_config.to_dict(), "experts": soup.n, "domains": soup.k,
        "router_hidden": soup.config.router.hidden, "expert_rank": soup.config.expert_rank,
        "parameters": counts, "storage_dtype": meta.get("storage_dtype"), "embedder": soup.embedder.to_dict(),
        "provenance": meta.get("provenance", {}), "sdk_version": meta.get("sdk_version"),
        "tensors_verified": checked, "merge_kernel": fused.instruction_set(),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    m = soup.model_config
    prov = summary["provenance"]
    lines = [
        f"{archive}  ({summary['bytes'] / 1e6:.1f} MB, .soe v1, written by soe-sdk {summary['sdk_version']})",
        f"  model      GPT-2 style: d={m.d_model}, layers={m.n_layers}, heads={m.n_heads}, mlp={m.d_mlp}, "
        f"vocab={m.vocab_size}, context={m.max_seq_len}",
        f"  soup       n={soup.n} experts{' (rank ' + str(soup.config.expert_rank) + ')' if soup.config.expert_rank else ''}, "
        f"k={soup.k} domains, router hidden={soup.config.router.hidden}, stored as {summary['storage_dtype']}",
        f"  parameters {_human(counts['instantiated'])} per specialist, {_human(counts['experts'])} in the expert bank, "
        f"{_human(counts['total'])} in all",
        f"  embedder   {soup.embedder.name} (dim {soup.embedder.dim}, max {soup.embedder.max_seq_length} tokens"
        f"{f' of the first {soup.embedder.max_chars} characters' if soup.embedder.max_chars else ''}, "
        f"{soup.embedder.precision}{', normalised' if soup.embedder.normalize else ''})",
        f"  trained    {prov.get('steps', '?')} steps, {_human(prov.get('tokens') or 0)} tokens on {prov.get('corpus') or '?'}"
        f" (preset {prov.get('preset', '?')}, {_meta_dist(prov)})",
    ]
    if prov.get("final_eval"):
        lines.append("  eval loss  " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(prov["final_eval"].items())))
    lines.append(f"  checksums  {checked} tensors verified" if checked else "  checksums  not verified (--no-verify)")
    kernel = summary["merge_kernel"]
    if kernel != "torch":
        lines.append(f"  merge      fused kernel ({kernel})")
    elif fused.built():
        lines.append("  merge      torch (the fused kernel is switched off by SOE_FUSED_MERGE=0)")
    else:
        lines.append("  merge      torch (the fused kernel is not built: reinstall soe-sdk with a C compiler present "
                     "for about 2× faster fp16/bf16 merges)")
    click.echo("\n".join(lines))


def _export_with_report(spec, fmt: str, out: Path) -> None:
    """Export, add report.json and the domain-weight chart, then move the whole folder into
    place in one rename: `out` is always either the previous folder or the complete new one."""
    import shutil
    import tempfile
    import time

    from exporters.folder import swap_into_place

    from .report import plot_domain_weights, report_dict, write_json

    out = out.expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        staged = scratch / out.name
        t = time.perf_counter()
        result = spec.export(staged, fmt)
        spec.timings["export"] = time.perf_counter() - t
        validation = getattr(result, "validation", {}) or {}
        if "seconds" in validation:
            spec.timings["validate"] = float(validation["seconds"])
            spec.timings["export"] -= spec.timings["validate"]
        write_json(staged / "report.json", report_dict(spec, export={"format": fmt, "validation": validation}))
        plot_domain_weights(spec.domain_weights, staged / "domain_weights.png")
        swap_into_place(staged, out)
    except OSError as exc:
        raise SoeError(f"{out}: cannot write the export ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--docs", required=True, type=click.Path(path_type=Path),
              help="Folder (searched recursively) or file of your documents: txt, md, html, pdf, docx, json, csv, code…")
@click.option("--format", "fmt", default="onnx", show_default=True,
              help="onnx, onnx-int8, onnx-int4, hf, gguf or safetensors.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder (replaced atomically).")
@click.option("--soup", "soups", multiple=True, type=click.Path(path_type=Path),
              help="Soup archive (.soe); default: the bundled demo soup. Repeat to let the documents pick the best "
                   "of several archives (e.g. domain-expert baselines).")
@click.option("--refine", is_flag=True, help="Tune α by gradient descent on the documents (early-stopped).")
@click.option("--finetune-tokens", type=int, help="Then fine-tune all parameters on up to N tokens of the documents "
                   "(4 learning rates tried, the best on a held-out slice kept).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Where to embed, merge and refine (default: cpu).")
@click.option("--max-docs", type=int, help="Use at most N chunks of the documents.")
@click.option("--max-embedded-chunks", default=256, show_default=True, type=int,
              help="Estimate the domain weights h from at most N random chunks (0: all of them).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--assignment", default="hard", show_default=True, type=click.Choice(["hard", "soft"]),
              help="Nearest centroid per chunk (paper Algorithm 3) or a softmax over distances.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def export_main(docs: Path, fmt: str, out: Path, soups: tuple[Path, ...], refine: bool, finetune_tokens: int | None,
                device: str | None, max_docs: int | None, max_embedded_chunks: int, seed: int, assignment: str,
                quiet: bool) -> None:
    """Build a specialist model for your documents from a Soup-of-Experts and export it."""
    from exporters import FORMATS

    from .report import summary_text
    from .specialist import specialize

    if fmt not in FORMATS:
        _fail(SoeError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}"))
    if out.exists() and not out.is_dir():
        _fail(SoeError(f"{out}: exists and is not a folder"))
    problem = _unwritable(out)
    if problem:  # fail before minutes of embedding, not after
        _fail(SoeError(f"{out}: cannot be written ({problem})"))
    try:
        soup = list(soups) if len(soups) > 1 else (soups[0] if soups else None)
        spec = specialize(docs, soup=soup, refine=refine, device=device, max_docs=max_docs, seed=seed,
                          finetune=finetune_tokens, assignment=assignment,
                          max_embedded_chunks=max_embedded_chunks or None, progress=not quiet)
        _export_with_report(spec, fmt, out)
    except SoeError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _fail(SoeError("interrupted; the output folder was left as it was"))
    click.echo(summary_text(spec))
    click.echo(f"wrote {fmt} specialist to {out}/ (report.json, domain_weights.png)")


if __name__ == "__main__":  # python -m soe_sdk.cli info|export ...
    commands = {"info": info_main, "export": export_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit("usage: python -m soe_sdk.cli {info,export} ...")
    command = commands[sys.argv.pop(1)]
    command()
