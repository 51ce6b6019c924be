"""The ``serve`` suite of ``pvt bench`` (not in the default run; needs the ``serve`` extra): ``pvt
serve`` under load, dynamic batching against none.

A PVT v2-b0 classifier (the digits preset at 224 px, untrained: speed does not depend on the
weights' values) is served by two ``pvt serve`` subprocesses, ``--max-batch 8`` and
``--max-batch 1``; 1 and 8 concurrent clients (threads, one keep-alive connection each) send a
224x224 PNG as the raw body, 32 requests per round, ``--repeats`` rounds alternating between the
servers. Reported: the median round's requests per second, p50 and p99 of all the clients'
round-trip latencies, and the mean batch the server ran each request in.

Then, where Ray Serve is installed, ``--engine ray`` with 1 and 2 replicas (``--max-batch 8``),
each alternated round by round with the local ``--max-batch 8`` server: on a machine of few cores
the rows measure what Ray's proxy and replicas cost (``x local``: requests/s against the local
server's in the same rounds), not a speed-up.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from pvt.bench.harness import Row, Settings, suite

MAX_BATCHES = (8, 1)
CLIENTS = (1, 8)
RAY_REPLICAS = (1, 2)


def serve_table(rows: list[Row], peaks: dict[str, float]) -> list[str]:
    out = ["`pvt serve` in a subprocess, clients on keep-alive connections (pvt.bench.serve):", "",
           "| setting | server | requests/s | p50 ms | p99 ms | requests | mean batch, against local |",
           "|---" * 7 + "|"]  # fmt: skip
    for r in rows:
        out.append(f"| {r.setting} | {r.contender} | {r.rps:.1f} | {r.ms:.0f} | {r.p99_ms:.0f} | {r.repeats} | "
                   f"{r.note.removeprefix('mean batch ')} |")  # fmt: skip
    return [*out, ""]


@suite("serve", default=False, table=serve_table, needs="serve", doc="pvt serve under load, batching vs --max-batch 1")
def suite_serve(s: Settings) -> None:
    size, per_round = (64, 8) if s.quick else (224, 32)
    with tempfile.TemporaryDirectory(prefix="pvt-bench-serve-") as tmp, ExitStack() as servers:
        ckpt = write_classifier(Path(tmp), size)
        image = png_bytes(size)
        # Both servers run side by side (the idle one waits on its queue) and are loaded in
        # alternation, round after round, so that the machine's drift hits both alike.
        ports = {mb: servers.enter_context(serving(ckpt, mb, s.threads)) for mb in MAX_BATCHES}
        for port in ports.values():
            load(port, image, clients=8, requests=16)  # warm-up: every batch size seen once
        for clients in CLIENTS:
            rounds: dict[int, list[tuple[list[float], float, list[int]]]] = {mb: [] for mb in MAX_BATCHES}
            for r in range(s.repeats):
                for mb in MAX_BATCHES[r % 2 :] + MAX_BATCHES[: r % 2]:
                    rounds[mb].append(load(ports[mb], image, clients, per_round))
            for mb, runs in rounds.items():
                ms = sorted(1e3 * t for latencies, _, _ in runs for t in latencies)
                rps = sorted(len(latencies) / wall for latencies, wall, _ in runs)[len(runs) // 2]
                batches = [b for _, _, sizes in runs for b in sizes]
                s.rows.append(Row(
                    "serve", f"pvt_v2_b0 {size}px, {clients} client{'s' if clients > 1 else ''}",
                    f"--max-batch {mb}", ms[len(ms) // 2], len(ms), rps=rps,
                    p99_ms=ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))],
                    note=f"mean batch {sum(batches) / len(batches):.1f}",
                ))  # fmt: skip
        if ray_serve_installed():
            for replicas in RAY_REPLICAS:
                with serving(ckpt, 8, s.threads, "--engine", "ray", "--replicas", str(replicas)) as ray_port:
                    load(ray_port, image, clients=8, requests=16)
                    for clients in CLIENTS:
                        paired: dict[str, list[tuple[list[float], float, list[int]]]] = {"local": [], "ray": []}
                        for r in range(s.repeats):
                            order = [("local", ports[8]), ("ray", ray_port)]
                            for name, port in order[r % 2 :] + order[: r % 2]:
                                paired[name].append(load(port, image, clients, per_round))
                        s.rows.append(ray_row(paired, size, clients, replicas))


def ray_serve_installed() -> bool:
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        return False
    return True


def ray_row(runs: dict[str, list[tuple[list[float], float, list[int]]]], size: int, clients: int,
            replicas: int) -> Row:  # fmt: skip
    """The Ray server's row; its note gives its requests/s against the local server's, same rounds."""
    rps = {name: sorted(len(lat) / wall for lat, wall, _ in rounds)[len(rounds) // 2] for name, rounds in runs.items()}
    ms = sorted(1e3 * t for latencies, _, _ in runs["ray"] for t in latencies)
    batches = [b for _, _, sizes in runs["ray"] for b in sizes]
    return Row(
        "serve", f"pvt_v2_b0 {size}px, {clients} client{'s' if clients > 1 else ''}",
        f"--engine ray --replicas {replicas}", ms[len(ms) // 2], len(ms), rps=rps["ray"],
        p99_ms=ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))],
        note=f"mean batch {sum(batches) / len(batches):.1f}, {rps['ray'] / rps['local']:.2f}x local",
    )  # fmt: skip


def write_classifier(run: Path, size: int) -> Path:
    """A run folder as ``pvt train`` leaves it (config.yaml, task.json, model.safetensors)."""
    from pvt.checkpoint import save_safetensors
    from pvt.engine import load_recipe
    from pvt.engine.presets import load_preset
    from pvt.tasks import get_task

    task = get_task("classification")
    preset = load_preset("classification", "digits")
    recipe = load_recipe("classification", task.data_config, preset, [f"data.input_size={size}"],
                         model_cls=task.model_config)  # fmt: skip
    recipe.dump(run / "config.yaml")
    (run / "task.json").write_text(json.dumps({"classes": [str(i) for i in range(recipe.model.num_classes)]}))
    save_safetensors(task.build_model(recipe).state_dict(), run / "model.safetensors", arch=recipe.model.name)
    return run / "model.safetensors"


def png_bytes(size: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@contextmanager
def serving(ckpt: Path, max_batch: int, threads: int, *args: str) -> Iterator[int]:
    """``pvt serve`` on 127.0.0.1, a free port; yields the port; always stopped."""
    cmd = [sys.executable, "-m", "pvt.cli", "serve", "--checkpoint", str(ckpt), "--port", "0",
           "--max-batch", str(max_batch), "--max-queue", "64", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "RAY_ADDRESS": ""}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # the server prints its address once the model is loaded
            if not line.startswith("serving on http://"):
                log.seek(0)
                raise RuntimeError(f"pvt serve did not start (exit {proc.wait()}):\n{log.read().decode()[-3000:]}")
            yield int(line.rsplit(":", 1)[1])
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def load(port: int, image: bytes, clients: int, requests: int) -> tuple[list[float], float, list[int]]:
    """``requests`` in all from ``clients`` threads: (round-trip seconds, wall seconds, batch sizes)."""

    def client(count: int) -> list[tuple[float, int]]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        out = []
        try:
            for _ in range(count):
                start = time.perf_counter()
                conn.request("POST", "/v1/predict", body=image, headers={"Content-Type": "image/png"})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"pvt serve answered {response.status}: {body[:500]!r}")
                out.append((time.perf_counter() - start, int(response.getheader("X-Batch-Size", "0"))))
        finally:
            conn.close()
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        shares = [requests // clients + (i < requests % clients) for i in range(clients)]
        done = [r for part in pool.map(client, shares) for r in part]
    wall = time.perf_counter() - start
    return [t for t, _ in done], wall, [b for _, b in done]
