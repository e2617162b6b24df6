"""Processes that die, race or run out of disk leave only complete results behind.

- training SIGKILLed (even in the middle of a checkpoint write) resumes from the last
  complete checkpoint, which verifies, and ends bit-identical to an uninterrupted run;
- an export killed mid-way leaves the output folder as it was (absent, or the previous
  export intact); concurrent exports to one folder never expose a partial or mixed folder;
- a full disk gives a one-line error and leaves the previous checkpoint / export intact.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from exporters import export
from soe_sdk.archive import Archive
from soe_sdk.errors import SoeError
from soe_sdk.model import init_parameters
from trainer import checkpoint as ckpt

from ..conftest import TINY_MODEL, make_workdir, tiny_tokenizer_json, write_tiny_soup
from .conftest import subprocess_env

TRAIN_ARGS = ["--max-steps", "12", "--checkpoint-every", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def template_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("template") / "work")


@pytest.fixture(scope="module")
def reference_run(template_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Final checkpoint tensors of the uninterrupted run every killed run must reproduce."""
    work = _copy_workdir(template_workdir, tmp_path_factory.mktemp("reference"))
    done = subprocess.run(_train(work, *TRAIN_ARGS), capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return _final_tensors(work)


def _copy_workdir(template: Path, parent: Path) -> Path:
    return Path(shutil.copytree(template, parent / "work", ignore=shutil.ignore_patterns("runs")))


def _train(work: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "train", str(work), "--threads", "1", *args]


def _ckpt_dir(work: Path) -> Path:
    return work / "runs" / "soup" / "checkpoints"


def _final_tensors(work: Path) -> dict[str, torch.Tensor]:
    step = ckpt.latest_step(_ckpt_dir(work))
    return ckpt.load_checkpoint(_ckpt_dir(work), step)[0]


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> bool:
    """SIGKILL `proc` as soon as `ready()` holds; False if it exited first."""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if ready():
                proc.send_signal(signal.SIGKILL)
                return True
            if proc.poll() is not None:
                return False
            time.sleep(0.0005)
        raise AssertionError(f"condition not reached within {timeout}s")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _check_checkpoints_after_kill(work: Path) -> int | None:
    """Every visible checkpoint file verifies; LATEST (if any) names one of them."""
    directory = _ckpt_dir(work)
    if not directory.exists():
        return None
    for path in directory.glob("step-*.ckpt"):
        with Archive(path) as archive:  # a torn file would fail here
            archive.verify_all()
    step = ckpt.latest_step(directory)
    if step is not None:
        tensors, state = ckpt.load_checkpoint(directory, step)
        assert state["optimizer_steps"] == step
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    return step


def _resume_and_compare(work: Path, reference: dict[str, torch.Tensor]) -> None:
    done = subprocess.run(_train(work, *TRAIN_ARGS), capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (work / "runs" / "soup" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, 13))  # no step lost or repeated in the log
    final = _final_tensors(work)
    assert final.keys() == reference.keys()
    for name in final:
        assert torch.equal(final[name], reference[name]), name  # bit-exact on CPU
    assert not list(_ckpt_dir(work).glob(".step-*")), "stale temp checkpoint left behind"


def test_kill_during_checkpoint_write_resumes_from_last_complete_one(
        template_workdir: Path, reference_run: dict[str, torch.Tensor], tmp_path: Path) -> None:
    work = _copy_workdir(template_workdir, tmp_path)
    directory = _ckpt_dir(work)

    def writing_second_checkpoint() -> bool:
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return False
        return "LATEST" in names and any(n.startswith(".step-") and n.endswith(".tmp") for n in names)

    proc = subprocess.Popen(_train(work, *TRAIN_ARGS), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=subprocess_env())
    assert _kill_when(proc, writing_second_checkpoint), "the run ended before a checkpoint write was caught"
    torn = [p for p in directory.iterdir() if p.name.startswith(".step-")]
    assert torn, "the kill did not land inside a checkpoint write"
    step = _check_checkpoints_after_kill(work)
    assert step is not None and step >= 2
    _resume_and_compare(work, reference_run)


@pytest.mark.slow
def test_kill_at_random_moments_always_resumes(template_workdir: Path, reference_run: dict[str, torch.Tensor],
                                               tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("SOE_FUZZ_SEED", "0")))
    for attempt in range(6):
        work = _copy_workdir(template_workdir, tmp_path / f"attempt{attempt}")
        proc = subprocess.Popen(_train(work, *TRAIN_ARGS), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=subprocess_env())
        time.sleep(rng.uniform(1.0, 6.0))  # from start-up to the end of the run
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _check_checkpoints_after_kill(work)
        _resume_and_compare(work, reference_run)


# ---------------------------------------------------------------- exports

@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return tiny_tokenizer_json(TINY_MODEL.vocab_size)


def _params(seed: int) -> dict[str, torch.Tensor]:
    return init_parameters(TINY_MODEL, torch.Generator().manual_seed(seed))


def _assert_complete_export(folder: Path, *, with_report: bool = False) -> dict:
    info = json.loads((folder / "specialist.json").read_text())
    for name, size in info["files"].items():
        assert (folder / name).stat().st_size == size, name
    assert set(load_file(str(folder / "model.safetensors"))) == set(TINY_MODEL.parameter_shapes())
    if with_report:
        report = json.loads((folder / "report.json").read_text())
        assert report["docs"]["fingerprint"] == info["docs"]["fingerprint"]
        assert (folder / "domain_weights.png").stat().st_size > 0
    return info


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_killed_export_leaves_the_previous_export_intact(tiny_soup_path: Path, tokenizer_json: str,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "exports" / "specialist"
    export(_params(1), TINY_MODEL, tokenizer_json, out, "safetensors", metadata={"name": "previous"})
    before = _tree_bytes(out)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("The river ran slowly past the old mill.\n\nSELECT name FROM users;\n")
    cmd = [sys.executable, "-m", "soe_sdk.cli", "export", "--docs", str(docs), "--soup", str(tiny_soup_path),
           "--format", "safetensors", "--out", str(out), "--quiet"]
    # Without the offline flags: loading the embedder must not even try the network (the guard logs tries).
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=subprocess_env(offline_flags=False))
    assert _kill_when(proc, lambda: bool(_leftovers(out.parent, out.name))), "export ended before staging began"
    assert _tree_bytes(out) == before  # the kill landed mid-export: nothing of it is visible
    assert _assert_complete_export(out)["name"] == "previous"


_WRITER = r"""
import sys, torch
from pathlib import Path
from exporters import export
from soe_sdk.model import init_parameters
from tests.conftest import TINY_MODEL
writer, count, out, tokenizer = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]).read_text()
for i in range(count):
    params = init_parameters(TINY_MODEL, torch.Generator().manual_seed(i))
    export(params, TINY_MODEL, tokenizer, out, "safetensors", metadata={"name": f"writer-{writer}-{i}"})
print("done", writer)
"""


def _snapshot(out: Path) -> str | None:
    """Check the folder instance now at `out` is complete and self-consistent; return its name.

    Files are read through a descriptor of that very folder, so a concurrent swap cannot mix
    two instances into one reading; None if `out` is absent.
    """
    try:
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        def read(name: str) -> bytes:
            with open(os.open(name, os.O_RDONLY, dir_fd=fd), "rb") as handle:
                return handle.read()
        try:
            info = json.loads(read("specialist.json"))
            sizes = {name: len(read(name)) for name in info["files"]}
            readme = read("README.md").decode()
        except FileNotFoundError:
            if os.fstat(fd).st_ino != os.stat(out).st_ino:
                return "retired"  # swapped out and being deleted while we read: not a violation
            raise
        assert sizes == info["files"], (info["name"], sizes)
        assert readme.startswith(f"# {info['name']} — "), (info["name"], readme[:80])
        return info["name"]
    finally:
        os.close(fd)


def test_concurrent_exports_to_one_folder_never_interleave(tokenizer_json: str, tmp_path: Path) -> None:
    out = tmp_path / "shared-out"
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer_file.write_text(tokenizer_json)
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, w, "8", str(out), str(tokenizer_file)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
               for w in ("a", "b")]
    seen: set[str] = set()
    absent_after_first = 0
    while any(w.poll() is None for w in writers):
        name = _snapshot(out)
        if name is None:
            absent_after_first += bool(seen)
        elif name != "retired":
            seen.add(name)
    for w in writers:
        stdout, stderr = w.communicate()
        assert w.returncode == 0, stderr[-2000:]
    assert absent_after_first == 0  # the folder is exchanged atomically, never missing
    final = _assert_complete_export(out)["name"]
    assert final in {"writer-a-7", "writer-b-7"}
    assert len(seen) >= 2, seen  # the watcher did observe the folder changing hands
    assert _leftovers(tmp_path, out.name) == []


@pytest.mark.slow
def test_two_cli_exports_at_once_give_one_consistent_folder(tiny_soup_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    procs = []
    for i, text in enumerate(["The river ran slowly past the old mill and the miller watched.",
                              "SELECT name, email FROM users WHERE active = true ORDER BY name;"]):
        docs = tmp_path / f"docs{i}"
        docs.mkdir()
        (docs / "doc.txt").write_text(text)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "soe_sdk.cli", "export", "--docs", str(docs), "--soup", str(tiny_soup_path),
             "--format", "safetensors", "--out", str(out), "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env()))
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-2000:]
    _assert_complete_export(out, with_report=True)
    assert _leftovers(tmp_path, out.name) == []


@pytest.mark.slow
def test_cli_export_killed_at_random_moments(tiny_soup_path: Path, tokenizer_json: str, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("SOE_FUZZ_SEED", "0")))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "doc.txt").write_text("The committee met on Tuesday to review the budget for the coming year.")
    for attempt in range(4):
        out = tmp_path / f"out{attempt}"
        previous = attempt % 2 == 1
        if previous:
            export(_params(attempt), TINY_MODEL, tokenizer_json, out, "safetensors", metadata={"name": "previous"})
        proc = subprocess.Popen([sys.executable, "-m", "soe_sdk.cli", "export", "--docs", str(docs), "--soup",
                                 str(tiny_soup_path), "--format", "safetensors", "--out", str(out), "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
        time.sleep(rng.uniform(2.0, 20.0))
        proc.kill()
        proc.wait()
        if out.exists():
            _assert_complete_export(out)  # the previous export, or the new one, whole
        else:
            assert not previous, "the previous export disappeared"


# ---------------------------------------------------------------- full disk

def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to simulate a full disk: {done.stderr.strip() or done.returncode}")


def _unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(path: Path, leave_bytes: int) -> None:
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(path / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave_bytes))


def test_full_disk_during_checkpoint_is_one_clear_line(template_workdir: Path, tmp_path: Path) -> None:
    mount = tmp_path / "disk"
    _mount_tmpfs(mount, "24m")
    try:
        work = _copy_workdir(template_workdir, mount)
        first = subprocess.run(_train(work, "--max-steps", "4", "--checkpoint-every", "2"), capture_output=True,
                               text=True, env=subprocess_env(), timeout=300)
        assert first.returncode == 0, first.stderr[-2000:]
        _fill(mount, 1 << 20)  # room for logs, not for an 8 MB checkpoint
        full = subprocess.run(_train(work, "--max-steps", "8", "--checkpoint-every", "2"), capture_output=True,
                              text=True, env=subprocess_env(), timeout=300)
        assert full.returncode == 1
        assert "Traceback" not in full.stderr
        errors = re.findall(r"error: [^\r\n]*", full.stderr)  # the progress bar shares stderr
        assert len(errors) == 1 and "No space left on device" in errors[0], full.stderr[-2000:]
        assert str(_ckpt_dir(work) / ckpt.checkpoint_name(6)) in errors[0]
        assert _check_checkpoints_after_kill(work) == 4  # the previous checkpoint is intact and verifies
        assert not list(_ckpt_dir(work).glob(".step-*")), "the failed write left a temp file"
    finally:
        _unmount(mount)


def test_full_disk_during_export_keeps_the_previous_export(tokenizer_json: str, tmp_path: Path) -> None:
    mount = tmp_path / "disk"
    _mount_tmpfs(mount, "2m")
    try:
        out = mount / "specialist"
        export(_params(1), TINY_MODEL, tokenizer_json, out, "safetensors", metadata={"name": "previous"})
        before = _tree_bytes(out)
        _fill(mount, 32 << 10)
        with pytest.raises(SoeError) as info:
            export(_params(2), TINY_MODEL, tokenizer_json, out, "safetensors", metadata={"name": "new"})
        message = str(info.value)
        assert "\n" not in message and str(out) in message and "No space left on device" in message
        assert _tree_bytes(out) == before
        assert _leftovers(mount, out.name) == []
    finally:
        _unmount(mount)
