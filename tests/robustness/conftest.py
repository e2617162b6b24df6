"""Robustness tests run offline: any attempt to reach another machine fails the test.

The guard covers this process (socket patched for the duration of each test) and every
Python subprocess a test starts (PYTHONPATH carries a `sitecustomize` that installs the
same guard and logs refused attempts to a file checked after the test).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

GUARD_DIR = Path(__file__).parent / "netguard"
REPO = Path(__file__).resolve().parents[2]

sys.path.insert(0, str(GUARD_DIR))
import soe_netguard  # noqa: E402


def subprocess_env(offline_flags: bool = True, **extra: str) -> dict[str, str]:
    """Environment for a child process: guarded, one thread, the repo importable.

    `offline_flags=False` drops HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, to prove the code needs
    no network even when the libraries are allowed to try (the guard then records any try).
    """
    env = dict(os.environ)
    parts = [str(GUARD_DIR), str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(parts), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    if offline_flags:
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    else:
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("TRANSFORMERS_OFFLINE", None)
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def no_network(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    log = tmp_path_factory.mktemp("netguard") / "refused.log"
    monkeypatch.setenv("SOE_NETGUARD_LOG", str(log))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    soe_netguard.attempts.clear()
    soe_netguard.install()
    try:
        yield
    finally:
        soe_netguard.uninstall()
    refused = list(soe_netguard.attempts) + (log.read_text().splitlines() if log.exists() else [])
    soe_netguard.attempts.clear()
    assert not refused, f"network access attempted: {refused[:5]}"
