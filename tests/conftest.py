"""Shared test set-up: offline hubs, deterministic small CPU runs, peer-model helpers."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def perturb_(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Add noise to every parameter so that norms, biases and tables all differ from their init:
    a tensor loaded into the wrong place then changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def train_two_ranks(out: Path, cache: Path, task: str, preset: str, sets: list[str]) -> dict[str, float]:
    """Train ``preset`` for ``task`` under torchrun with two gloo processes (tests/ddp_worker.py);
    check both ranks end with identical weights and buffers; return the run's ``final.json``."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(repo / "tests" / "ddp_worker.py"), str(out), task, preset, *sets]  # fmt: skip
    env = {**os.environ, "PVT_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=repo, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    return json.loads((out / "run" / "final.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PVT_CACHE folder holding the digits preset's exported images (one per test module)."""
    from pvt.classification import export_digits

    root = tmp_path_factory.mktemp("cache")
    os.environ["PVT_CACHE"] = str(root)
    export_digits()
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A PVT_CACHE folder shared by a test module's trainings (the session's base temp folder)."""
    root = tmp_path_factory.getbasetemp() / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PVT_CACHE", str(root))
        yield root


def stop_process(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not ended within ``timeout`` seconds; always reaped."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
