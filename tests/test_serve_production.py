"""``pvt serve`` in front of real traffic: API keys, a bounded queue (503 + Retry-After), request
timeouts (504), clients that leave, a bounded graceful shutdown, Prometheus metrics, access logs,
and early refusals every client can read. Subprocess servers on 127.0.0.1, real HTTP clients."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from test_serve import _read_url, assert_same, drive_page, images_of, predict_records, trained  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parent.parent
KEYS = ["k" * 20 + "-first", "second-key-0123456789abcdef"]
# A digits classifier run at 224 px: a forward of tens of milliseconds on two cores, long enough
# for requests to pile up behind it.
SLOW = ["--set", "data.input_size=224"]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[str]
    log: Any

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stderr(self) -> str:
        self.log.seek(0)
        return str(self.log.read().decode())


@contextmanager
def server(ckpt: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """``pvt serve`` as a subprocess on 127.0.0.1, port 0; always stopped."""
    cmd = [sys.executable, "-m", "pvt.cli", "serve", "--checkpoint", str(ckpt), "--port", "0", *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=full_env, cwd=REPO, text=True)
        try:
            yield Server(_read_url(proc, log), proc, log)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def metrics(url: str, key: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed by prometheus-client's own parser: {(sample name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def sample(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(url: str, name: str, at_least: float, what: str, seconds: float = 60, **labels: str) -> None:
    """Until the server's metric ``name`` (with ``labels``) reaches ``at_least``."""
    deadline = time.monotonic() + seconds
    while sample(metrics(url), name, **labels) < at_least:
        assert time.monotonic() < deadline, f"{what} within {seconds:.0f} s: {metrics(url)}"
        time.sleep(0.05)


def wait_in_flight(url: str, count: int) -> None:
    """Until the server holds ``count`` requests (besides the /metrics request asking)."""
    wait_for(url, "pvt_serve_requests_in_flight", count + 1, f"the server never held {count} requests at once")


def wait_queued(url: str, count: int) -> None:
    """Until ``count`` requests wait in the batch queue (read, decoded and submitted, not just arrived)."""
    wait_for(url, "pvt_serve_queue_depth", count, f"the batch queue never held {count} requests")


def burst(url: str, body: bytes, count: int, key: str | None = None) -> list[httpx.Response]:
    """``count`` requests at once, one connection each."""
    headers = {"Content-Type": "image/png", **({"Authorization": f"Bearer {key}"} if key else {})}
    barrier = threading.Barrier(count)

    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=120) as client:
            barrier.wait(timeout=60)
            return client.post("/v1/predict", content=body, headers=headers)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_keys_guard_v1_and_every_client_reads_early_refusals(
    trained: Callable[[str], Path],  # noqa: F811
    cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = trained("classification")
    image = images_of("classification", cache, 1)[0]
    (expected,) = predict_records(capsys, "classification", ckpt, [image])
    keys = tmp_path / "keys"
    keys.write_text(f"# one key per line\n{KEYS[0]}\n\n{KEYS[1]}\n")
    with server(ckpt, "--api-key-file", str(keys), "--max-upload-mb", "1", "--log-format", "json") as s:
        url = s.url
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}  # open: balancers probe it keyless
        assert "API key" in httpx.get(url).text  # the page, which asks for the key
        refused = httpx.get(f"{url}/v1/model")
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        assert "Authorization: Bearer" in refused.json()["detail"]
        wrong = httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {KEYS[0]}x"})
        assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong API key"
        for key in KEYS:
            answer = httpx.post(f"{url}/v1/predict", content=image.read_bytes(),
                                headers={"Authorization": f"Bearer {key}"})  # fmt: skip
            assert answer.status_code == 200, answer.text
            record = answer.json()
            record.pop("latency_ms")
            assert_same(record, {**expected, "image": "upload", "id": "upload"})
        assert httpx.post(f"{url}/v1/predict", content=image.read_bytes()).status_code == 401
        # Python's urllib sends the whole body before it reads: it must still read the refusal,
        # not a connection reset, for a request without its key and for an over-size upload.
        for headers, status in (({}, 401), ({"Authorization": f"Bearer {KEYS[0]}"}, 413)):
            request = urllib.request.Request(f"{url}/v1/predict", data=b"\0" * (3 << 20), headers=headers)
            with pytest.raises(urllib.error.HTTPError) as refusal:
                urllib.request.urlopen(request, timeout=60)
            assert refusal.value.code == status
        assert httpx.get(f"{url}/healthz").status_code == 200
        log = [json.loads(line) for line in s.stderr().splitlines() if line.startswith("{")]
    # One JSON access log line per request, in order.
    assert [(e["method"], e["path"], e["status"]) for e in log][:4] == [
        ("GET", "/healthz", 200), ("GET", "/", 200), ("GET", "/v1/model", 401), ("GET", "/v1/model", 401)]  # fmt: skip
    predicted = [e for e in log if e["path"] == "/v1/predict" and e["status"] == 200]
    assert len(predicted) == 2 and all(e["batch"] == 1 and e["duration_ms"] > 0 and e["bytes"] > 0 for e in predicted)
    assert {e["client"] for e in log} == {"127.0.0.1"} and all("time" in e for e in log)


def test_the_page_asks_for_the_key_once_and_keeps_it_in_the_tab(
    trained: Callable[[str], Path],  # noqa: F811
    cache: Path,
    tmp_path: Path,
) -> None:
    ckpt = trained("classification")
    image = images_of("classification", cache, 1)[0]
    with server(ckpt, env={"PVT_API_KEY": KEYS[1]}) as s:
        shown = drive_page(s.url, image, tmp_path / "page.png", key=KEYS[1])
    # The browser logs the first, keyless /v1/model's 401 (which made the page ask), and nothing else.
    assert [e for e in shown["errors"] if "/v1/model" not in e or "401" not in e] == [], shown["errors"]
    assert shown["state"] == "done" and not shown["error"], shown
    assert shown["model"].startswith("classification · pvt_v2_b0") and not shown["asked_again"]


def test_without_keys_it_refuses_to_listen_beyond_this_machine(trained: Callable[[str], Path], tmp_path: Path) -> None:  # noqa: F811
    ckpt = trained("classification")
    cmd = [sys.executable, "-m", "pvt.cli", "serve", "--checkpoint", str(ckpt), "--host", "0.0.0.0", "--port", "0"]
    env = {k: v for k, v in os.environ.items() if k != "PVT_API_KEY"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert done.returncode != 0 and "refusing to serve on 0.0.0.0 without API keys" in done.stderr
    assert "--insecure-public" in done.stderr and "serving on" not in done.stdout
    short = tmp_path / "short"
    short.write_text("abc\n")
    done = subprocess.run([*cmd, "--api-key-file", str(short)], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO)  # fmt: skip
    assert done.returncode != 0 and f"{short}:1" in done.stderr and "openssl rand -hex 32" in done.stderr


def test_a_burst_beyond_the_queue_gets_503_then_normal_answers_and_metrics_count_it(
    trained: Callable[[str], Path],  # noqa: F811
    cache: Path,
) -> None:
    ckpt = trained("classification")
    body = images_of("classification", cache, 1)[0].read_bytes()
    with server(ckpt, *SLOW, "--max-batch", "1", "--max-queue", "2", "--batch-wait-ms", "0") as s:
        answers = burst(s.url, body, 16)
        statuses = [r.status_code for r in answers]
        busy = [r for r in answers if r.status_code == 503]
        assert set(statuses) == {200, 503} and len(busy) >= 4, statuses
        for r in busy:  # refused at once, saying when to come back
            assert int(r.headers["Retry-After"]) >= 1 and "busy" in r.json()["detail"]
        assert (
            max(r.elapsed.total_seconds() for r in busy)
            < min(r.elapsed.total_seconds() for r in answers if r.status_code == 200) + 5.0
        )
        # Drained: one at a time, every request is answered.
        after = [httpx.post(f"{s.url}/v1/predict", content=body).status_code for _ in range(3)]
        assert after == [200, 200, 200]
        m = metrics(s.url)
    ok = statuses.count(200) + 3
    assert sample(m, "pvt_serve_requests_total", route="/v1/predict", method="POST", status="200") == ok
    assert sample(m, "pvt_serve_requests_total", route="/v1/predict", method="POST", status="503") == len(busy)
    assert sample(m, "pvt_serve_rejected_total", reason="queue_full") == len(busy)
    assert sample(m, "pvt_serve_batch_size_count") == ok and sample(m, "pvt_serve_batch_size_sum") == ok
    assert sample(m, "pvt_serve_inference_seconds_count") == ok
    assert sample(m, "pvt_serve_request_duration_seconds_count", route="/v1/predict") == 16 + 3
    assert sample(m, "pvt_serve_queue_depth") == 0 and sample(m, "pvt_serve_draining") == 0
    assert sample(m, "pvt_serve_model_info", task="classification", architecture="pvt_v2_b0",
                  weights=str(ckpt)) == 1  # fmt: skip


def test_timeouts_get_504_and_clients_that_leave_cost_no_forward(
    trained: Callable[[str], Path],  # noqa: F811
    cache: Path,
) -> None:
    ckpt = trained("classification")
    body = images_of("classification", cache, 1)[0].read_bytes()
    # Three requests wait for a fourth batch-mate for up to a minute: each times out after 2 s,
    # whatever the machine's speed. The fourth then fills the batch and is the only one computed.
    with server(ckpt, "--max-batch", "4", "--batch-wait-ms", "60000", "--timeout-s", "2") as s:
        answers = burst(s.url, body, 3)
        assert [r.status_code for r in answers] == [504] * 3, [r.text for r in answers]
        assert all("--timeout-s" in r.json()["detail"] for r in answers)
        last = httpx.post(f"{s.url}/v1/predict", content=body, timeout=60)
        assert last.status_code == 200 and last.headers["X-Batch-Size"] == "1", last.text
        m = metrics(s.url)
        assert sample(m, "pvt_serve_rejected_total", reason="timeout") == 3
        # Timed-out work left the queue: one forward, of one image.
        assert sample(m, "pvt_serve_batch_size_count") == 1 and sample(m, "pvt_serve_batch_size_sum") == 1

    # Clients that send a request and hang up while it waits for batch-mates (up to 3 s: they are
    # still waiting when the server sees them go, however fast the machine).
    with server(ckpt, "--max-batch", "8", "--batch-wait-ms", "3000", "--max-queue", "64") as s:
        request = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", s.port), timeout=30) as c:
                c.sendall(request)
        wait_for(s.url, "pvt_serve_rejected_total", 4, "4 disconnects not seen", seconds=30, reason="disconnected")
        stayed = httpx.post(f"{s.url}/v1/predict", content=body, timeout=60)
        assert stayed.status_code == 200 and stayed.headers["X-Batch-Size"] == "1", stayed.text
        assert sample(metrics(s.url), "pvt_serve_batch_size_sum") == 1  # the four left no forward behind


def test_sigterm_finishes_the_work_in_flight_refuses_new_connections_and_exits_within_the_grace(
    trained: Callable[[str], Path],  # noqa: F811
    cache: Path,
) -> None:
    ckpt = trained("classification")
    body = images_of("classification", cache, 1)[0].read_bytes()
    # Three requests wait for a fourth batch-mate for up to a minute: SIGTERM ends the wait.
    with server(ckpt, "--max-batch", "4", "--batch-wait-ms", "60000", "--grace-s", "20") as s:
        with ThreadPoolExecutor(3) as pool:
            waiting = [pool.submit(httpx.post, f"{s.url}/v1/predict", content=body, timeout=120) for _ in range(3)]
            wait_queued(s.url, 3)  # in flight is not enough: a request still decoding would miss the batch
            assert not any(f.done() for f in waiting)
            signalled = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in waiting]
        assert [(r.status_code, r.headers["X-Batch-Size"]) for r in answers] == [(200, "3")] * 3
        status = s.proc.wait(timeout=30)
        assert time.monotonic() - signalled < 20
        assert status in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{s.url}/healthz", timeout=5)
        log = s.stderr()
        assert "draining: 3 requests in flight or queued; at most 20 s" in log
        assert "nothing left unanswered" in log

    # More queued work than the grace allows (24 forwards of a few hundred milliseconds at 448 px):
    # what is left when it runs out is answered 503.
    slower = ["--set", "data.input_size=448"]
    with server(ckpt, *slower, "--max-batch", "1", "--max-queue", "64", "--grace-s", "1") as s:
        # The first forward at a new size is slow (oneDNN picks its kernels): not within the grace.
        assert httpx.post(f"{s.url}/v1/predict", content=body, timeout=120).status_code == 200
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(burst, s.url, body, 24)
            wait_in_flight(s.url, 24)
            signalled = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            answers = queued.result()
        status = s.proc.wait(timeout=30)
        took = time.monotonic() - signalled
        statuses = [r.status_code for r in answers]
        assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
        assert all("shutting down" in r.json()["detail"] for r in answers if r.status_code == 503)
        assert took < 1 + 2 + 5 and status in (0, -signal.SIGTERM)  # the grace, the answers' margin, a forward
        assert f"{statuses.count(503)} still waiting answered 503" in s.stderr()


def test_batcher_drops_work_whose_caller_left_and_hurries_when_draining() -> None:
    from pvt.serve import Batcher, Draining, QueueFull

    gate = threading.Event()
    seen: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        gate.wait(10)
        seen.append(items)
        return [2 * i for i in items]

    async def main() -> None:
        batcher: Batcher[int, int] = Batcher(run, max_batch=2, wait_s=0.0, max_queue=2)
        batcher.start()
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.05)  # running, blocked on the gate
        gone, kept = asyncio.create_task(batcher.submit(2)), asyncio.create_task(batcher.submit(3))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await batcher.submit(4)
        gone.cancel()
        gate.set()
        assert await first == (2, 1) and await kept == (6, 1)
        assert seen == [[1], [3]] and batcher.dropped == 1
        # Draining: a batch that would wait a minute for company starts at once.
        batcher.wait_s = 60.0
        late = asyncio.create_task(batcher.submit(5))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        batcher.hurry()
        assert await late == (10, 1) and time.monotonic() - started < 5
        assert batcher.close(Draining("bye")) == 0
        with pytest.raises(Draining):
            await batcher.submit(6)
        await batcher.stop()

    asyncio.run(main())
