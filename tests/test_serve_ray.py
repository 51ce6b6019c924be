"""``pvt serve --engine ray``: the same app on two Ray Serve replicas of a local Ray instance (2 CPUs):
every answer equals ``pvt predict``'s record, both replicas answer, keys still guard ``/v1``, and
SIGTERM stops the replicas and Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from test_serve import _read_url, as_served, assert_same, images_of, predict_records, trained  # noqa: F401

pytest.importorskip("ray.serve")

REPO = Path(__file__).resolve().parent.parent
KEY = "ray-serve-test-key-0123456789"


def test_two_replicas_answer_what_predict_prints(
    trained: Callable[[str], Path],  # noqa: F811
    cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = trained("classification")
    images = images_of("classification", cache, 4)
    expected = {im.name: r for im, r in zip(images, predict_records(capsys, "classification", ckpt, images),
                                            strict=True)}  # fmt: skip
    cmd = [sys.executable, "-m", "pvt.cli", "serve", "--checkpoint", str(ckpt), "--port", "0", "--engine", "ray",
           "--replicas", "2", "--max-batch", "4", "--grace-s", "5"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PVT_API_KEY": KEY, "RAY_ADDRESS": ""}
    auth = {"Authorization": f"Bearer {KEY}"}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, cwd=REPO, text=True)
        try:
            url = _read_url(proc, log)
            assert httpx.get(f"{url}/healthz", timeout=60).json() == {"status": "ok"}
            assert httpx.get(f"{url}/v1/model", timeout=60).status_code == 401
            replicas = {httpx.get(f"{url}/v1/model", headers=auth, timeout=60).json()["replica"] for _ in range(20)}

            def send(image: Path) -> tuple[str, int, dict[str, Any]]:
                with httpx.Client(base_url=url, headers=auth, timeout=300) as client:
                    r = client.post("/v1/predict", files={"image": (image.name, image.read_bytes(), "image/png")})
                    return image.name, r.status_code, r.json()

            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(send, images * 3))
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.seek(0)
        stderr = log.read().decode()
    assert len(replicas) == 2, replicas  # both replicas answered
    assert len(answers) == 12
    for name, code, record in answers:
        assert code == 200, record
        record.pop("latency_ms")
        assert_same(record, as_served(expected[name], name))
    assert status == 0, stderr[-3000:]
    assert "draining: the replicas finish what they hold" in stderr
