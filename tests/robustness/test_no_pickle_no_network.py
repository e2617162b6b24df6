"""No code path can unpickle or evaluate data, and the robustness tests run with the network cut.

The source scan parses every module of soe_sdk/, trainer/ and exporters/ (so comments and
strings do not count) and flags: pickle-family imports, pickle/marshal loads, torch.load
without weights_only=True, numpy loads with allow_pickle=True, and the eval/exec builtins.
"""
from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, soe_netguard, subprocess_env

PACKAGES = ("soe_sdk", "trainer", "exporters")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def unsafe_calls(source: str, filename: str) -> list[str]:
    """Every unsafe import or call in one module, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                found.append(f"{where}: {name}()")
            elif name.endswith(("pickle.load", "pickle.loads", "marshal.load", "marshal.loads", "Unpickler")):
                found.append(f"{where}: {name}()")
            elif name.endswith("torch.load") and not _is_true(keywords.get("weights_only")):
                found.append(f"{where}: torch.load() without weights_only=True")
            elif name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy") \
                    and _is_true(keywords.get("allow_pickle")):
                found.append(f"{where}: {name}(allow_pickle=True)")
    return found


def test_the_scanner_catches_what_it_should() -> None:
    bad = "\n".join(["import pickle", "from dill import loads", "torch.load(path)", "torch.load(p, weights_only=False)",
                     "np.load(p, allow_pickle=True)", "eval(text)", "exec(code)", "x = pickle.loads(b)"])
    assert len(unsafe_calls(bad, "bad.py")) == 8
    good = "\n".join(["model.eval()", "torch.load(p, weights_only=True)", "np.load(p)", "'import pickle'",
                      "# eval(x)", "json.loads(s)", "evaluate(x)"])
    assert unsafe_calls(good, "good.py") == []


def test_sdk_sources_never_unpickle_or_evaluate() -> None:
    files = sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))
    assert len(files) > 20  # the scan really covers the packages
    problems = [issue for path in files for issue in unsafe_calls(path.read_text(encoding="utf-8"),
                                                                  str(path.relative_to(REPO)))]
    assert problems == []


# ---------------------------------------------------------------- the network guard itself

def test_guard_blocks_remote_hosts_and_allows_loopback() -> None:
    try:
        with pytest.raises(ConnectionRefusedError, match="blocked by the test guard"):
            socket.create_connection(("203.0.113.7", 443), timeout=2)  # TEST-NET-3: never routable
        with pytest.raises(ConnectionRefusedError, match="blocked by the test guard"):
            socket.getaddrinfo("huggingface.co", 443)
        assert len(soe_netguard.attempts) == 2
    finally:  # these refusals were the point of this test: forget them
        soe_netguard.attempts.clear()
        Path(os.environ["SOE_NETGUARD_LOG"]).unlink(missing_ok=True)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    with socket.create_connection(server.getsockname(), timeout=2):
        pass
    server.close()


def test_guard_covers_child_processes(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    done = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('203.0.113.7', 80), 2)"],
                          capture_output=True, text=True, env=subprocess_env(SOE_NETGUARD_LOG=str(log)), timeout=60)
    assert done.returncode != 0 and "blocked by the test guard" in done.stderr
    assert "203.0.113.7" in log.read_text()  # refused at the address lookup already
