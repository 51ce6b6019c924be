"""``pvt serve`` for real: the command as a subprocess on 127.0.0.1 (port 0), a real HTTP client,
every task's model answering what ``pvt predict`` prints, bad requests, load, and a real browser."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import stop_process
from pvt.cli import main as cli_main

REPO = Path(__file__).resolve().parent.parent
SHAPES = "data.shapes={image_size: 64, train_images: 8, val_images: 4, min_size: 12, max_size: 40}"
STEPS = ["schedule.iterations=2", "schedule.warmup_iters=1", "train.progress=false", "train.log_every=1"]
# Tiny, two-step runs of each task's embedded preset (the settings of the tasks' own tests).
RUNS: dict[str, tuple[str, str, list[str]]] = {
    "classification": ("classification", "digits", ["data.batch_size=64", "data.eval_batch_size=360"]),
    "retinanet": ("detection", "shapes-retinanet", [SHAPES, "model.fpn_channels=32", "model.min_size=[64]",
                                                    "model.max_size=64", "data.batch_size=4"]),
    "mask_rcnn": ("detection", "shapes-mask-rcnn", [SHAPES, "model.fpn_channels=32", "model.min_size=[64]",
                                                    "model.max_size=64", "data.batch_size=4"]),
    "segmentation": ("segmentation", "shapes-semantic-fpn", [SHAPES, "model.fpn_channels=32",
                     "model.head_channels=32", "data.scale=[128,64]", "data.crop_size=[64,64]",
                     "data.eval_scale=[128,64]", "data.batch_size=4"]),
}  # fmt: skip
# Two training steps leave detectors below the default 0.05 score: keep every detection instead.
SERVE_SETS = {"retinanet": ["model.score_thresh=0.0"], "mask_rcnn": ["model.score_thresh=0.0"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Callable[[str], Path]:
    """``trained(name)``: the weights of a RUNS entry, trained on first use in this module."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            task, preset, sets = RUNS[name]
            run = tmp_path_factory.mktemp(name) / "run"
            args = ["train", task, "--preset", preset, "--output", str(run)]
            assert cli_main([*args, *[a for s in (*sets, *STEPS) for a in ("--set", s)]]) == 0
            done[name] = run / "model.safetensors"
        return done[name]

    return get


def images_of(name: str, cache: Path, count: int = 2) -> list[Path]:
    """Validation images of the run's data: same size within a task, so that they share batches."""
    pattern = "digits/val/*/*.png" if name == "classification" else "shapes*/**/val2017/*.png"
    found = sorted(cache.glob(pattern))
    assert len(found) >= count, f"no images for {name} in {cache}"
    return found[:: max(1, len(found) // count)][:count]


def predict_records(
    capsys: pytest.CaptureFixture[str], name: str, ckpt: Path, images: list[Path], out: Path | None = None
) -> list[dict[str, Any]]:
    """What ``pvt predict`` prints, one record per image (in-process, the same code as the command)."""
    capsys.readouterr()
    sets = [a for s in SERVE_SETS.get(name, []) for a in ("--set", s)]
    extra = ["--out", str(out)] if out is not None else []
    if out is not None and name == "segmentation":  # the overlay, which the server draws too
        extra.append("--save-pictures")
    assert cli_main(["predict", RUNS[name][0], "--checkpoint", str(ckpt), *sets, *extra, *map(str, images)]) == 0
    if out is not None:
        records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    else:
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    order = {str(p): i for i, p in enumerate(images)}  # batches complete in any order: the inputs'
    return sorted(records, key=lambda r: order[r["image"]])


@contextmanager
def serving(ckpt: Path, *args: str) -> Iterator[str]:
    """``pvt serve`` as a subprocess on 127.0.0.1, port 0; yields its URL; always stopped."""
    cmd = [sys.executable, "-m", "pvt.cli", "serve", "--checkpoint", str(ckpt), "--host", "127.0.0.1", "--port", "0",
           *args]  # fmt: skip
    # The server computes with this process's thread count, so that its floats are predict's.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, cwd=REPO, text=True)
        try:
            yield _read_url(proc, log)
        finally:
            stop_process(proc)


def _read_url(proc: subprocess.Popen[str], log: Any) -> str:
    """The ``serving on http://127.0.0.1:PORT`` line, read within 180 s, or the server's log."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        for _ in range(360):
            if sel.select(timeout=0.5):
                line = proc.stdout.readline()
                if line.startswith("serving on http://127.0.0.1:"):
                    return line.split()[-1]
                if line:
                    continue
            if proc.poll() is not None:
                break
    log.seek(0)
    pytest.fail(f"pvt serve did not start (exit {proc.poll()}):\n{log.read().decode()[-3000:]}")


def post_image(url: str, path: Path, *, multipart: bool) -> httpx.Response:
    data = path.read_bytes()
    with httpx.Client(base_url=url, timeout=300) as client:
        if multipart:
            return client.post("/v1/predict", files={"image": (path.name, data, "image/png")})
        return client.post("/v1/predict", content=data, headers={"Content-Type": "image/png"})


def assert_same(got: Any, want: Any, where: str = "record") -> None:
    """Equal JSON, floats within 2e-3 (predict rounds boxes to 3 decimals; a batch's sums may differ
    in the last bits from one image's)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {len(got)} items, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert isinstance(got, float | int) and got == pytest.approx(want, abs=2e-3), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def as_served(record: dict[str, Any], name: str) -> dict[str, Any]:
    """A ``pvt predict`` record as the server names its image (the upload's file name; a detection's
    ``image_id`` is 1, the one image of its request, where predict numbers its inputs)."""
    record = {**record, "image": name, "id": name}
    if "results" in record:
        record["results"] = [{**d, "file_name": name, "image_id": 1} for d in record["results"]]
    return record


@pytest.mark.parametrize("name", list(RUNS))
def test_every_task_answers_what_predict_prints(
    name: str, trained: Callable[[str], Path], cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two images (one multipart, one raw body) run as one batch of two (the server waits up to a
    minute for a full batch) and each answer is predict's record for that image."""
    ckpt = trained(name)
    images = images_of(name, cache)
    expected = predict_records(capsys, name, ckpt, images, tmp_path / "pred")
    sets = [a for s in SERVE_SETS.get(name, []) for a in ("--set", s)]
    with serving(ckpt, "--max-batch", "2", "--batch-wait-ms", "60000", *sets) as url:
        info = httpx.get(f"{url}/v1/model").json()
        classes = json.loads((ckpt.parent / "task.json").read_text())["classes"]
        assert info["task"] == RUNS[name][0] and info["classes"] == classes and info["weights"] == str(ckpt)
        assert info["parameters"] > 0 and info["max_batch"] == 2
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post_image, url, images[0], multipart=True)
            # It waits for a batch-mate, and meanwhile the server answers other requests.
            assert httpx.get(f"{url}/healthz").json() == {"status": "ok"} and not first.done()
            second = post_image(url, images[1], multipart=False)
            answers = [first.result(), second]
    for response, want, sent_as in zip(answers, expected, [images[0].name, "upload"], strict=True):
        assert response.status_code == 200, response.text
        assert response.headers["X-Batch-Size"] == "2"
        got = response.json()
        assert got.pop("latency_ms") > 0
        if name == "segmentation":  # predict --out's two PNGs, as data: URLs: the same pixels
            for key in ("label_png", "overlay_png"):
                served = Image.open(io.BytesIO(base64.b64decode(got.pop(key).split(",", 1)[1])))
                assert np.array_equal(np.asarray(served), np.asarray(Image.open(want.pop(key)))), key
        assert_same(got, as_served(want, sent_as))
    if name == "mask_rcnn":  # masks travel as COCO RLE, as predict writes them
        assert all("segmentation" in d for d in expected[0]["results"]) and expected[0]["detections"] > 0


def test_bad_requests_get_4xx_and_the_server_keeps_serving(trained: Callable[[str], Path], cache: Path) -> None:
    ckpt = trained("classification")
    png = images_of("classification", cache, 1)[0].read_bytes()
    with serving(ckpt, "--max-upload-mb", "1") as url, httpx.Client(base_url=url) as client:

        def check(status: int, text: str, response: httpx.Response) -> None:
            assert response.status_code == status, response.text
            assert text in response.json()["detail"]
            assert client.get("/healthz").json() == {"status": "ok"}

        check(400, "no image", client.post("/v1/predict", files={"note": (None, "hello")}))
        check(400, "no image", client.post("/v1/predict", content=b""))
        no_boundary = {"Content-Type": "multipart/form-data"}
        check(400, "malformed multipart", client.post("/v1/predict", content=png, headers=no_boundary))
        check(415, "not an image", client.post("/v1/predict", content=b"hello, world" * 10))
        check(415, "not an image", client.post("/v1/predict", files={"image": ("a.txt", b"plain text")}))
        check(400, "truncated or corrupt", client.post("/v1/predict", content=png[: len(png) // 2]))
        check(400, "truncated or corrupt", client.post("/v1/predict", content=jpeg_with_garbage()))
        for side in (10_000, 40_000):  # over PIL's 89.5 Mpx limit; over twice it, where PIL itself refuses
            check(400, "decompression bomb", client.post("/v1/predict", files={"image": ("b.png", bomb_png(side))}))
        check(405, "Method Not Allowed", client.get("/v1/predict"))
        check(405, "Method Not Allowed", client.put("/v1/predict", content=png))
        # Over --max-upload-mb: refused on its Content-Length with most of the body never sent, or
        # while a chunked body without a length streams in.
        port = int(url.rsplit(":", 1)[1])
        head = f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {3 << 20}\r\n\r\n".encode()
        assert raw_exchange(port, head + png).startswith(b"HTTP/1.1 413")
        chunk = b"%x\r\n%s\r\n" % (64 << 10, b"\0" * (64 << 10))
        head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        assert raw_exchange(port, head + chunk * 17 + b"0\r\n\r\n").startswith(b"HTTP/1.1 413")
        check(413, "over the limit", client.post("/v1/predict", content=b"\0" * (2 << 20)))
        # Still serving, and documented.
        ok = client.post("/v1/predict", content=png)
        assert ok.status_code == 200 and len(ok.json()["top5"]) == 5
        assert "/v1/predict" in client.get("/openapi.json").json()["paths"]


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send bytes on a fresh connection; the server's first answer bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(request)
        return s.recv(4096)


def jpeg_with_garbage() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    data[200:] = b"\xff\xd9" * ((len(data) - 200) // 2)  # the scan data replaced by end markers
    return bytes(data)


def bomb_png(side: int) -> bytes:
    """A PNG header claiming ``side`` x ``side`` pixels (the guard trips before any pixel is decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_load_eight_clients_64_requests_all_correct(
    trained: Callable[[str], Path], cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = trained("classification")
    images = images_of("classification", cache, 4)
    expected = {im.name: r for im, r in zip(images, predict_records(capsys, "classification", ckpt, images),
                                            strict=True)}  # fmt: skip
    with serving(ckpt, "--max-batch", "8", "--batch-wait-ms", "5") as url:

        def client(k: int) -> list[tuple[str, int, dict[str, Any], int]]:
            with httpx.Client(base_url=url, timeout=300) as c:
                answers = []
                for i in range(8):
                    image = images[(k + i) % len(images)]
                    r = c.post("/v1/predict", files={"image": (image.name, image.read_bytes(), "image/png")})
                    answers.append((image.name, r.status_code, r.json(), int(r.headers.get("X-Batch-Size", 0))))
                return answers

        with ThreadPoolExecutor(8) as pool:
            answers = [a for part in pool.map(client, range(8)) for a in part]
    assert len(answers) == 64
    for sent, status, record, _ in answers:
        assert status == 200, record
        record.pop("latency_ms")
        assert_same(record, as_served(expected[sent], sent))
    sizes = [b for *_, b in answers]
    print(f"batch sizes seen under load: max {max(sizes)}, mean {sum(sizes) / len(sizes):.2f}")


def test_multipart_uploads_stay_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """python-multipart spills parts over 1 MiB to a temporary file by default; ours never do."""
    import tempfile as tempfile_module

    from pvt.serve.app import image_part

    def no_files(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an upload was written to a temporary file")

    monkeypatch.setattr(tempfile_module, "NamedTemporaryFile", no_files)
    monkeypatch.setattr(tempfile_module, "mkstemp", no_files)
    payload = bytes(range(256)) * (12 << 10)  # 3 MiB
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + payload + b"\r\n--XyZ--\r\n")  # fmt: skip
    assert image_part("multipart/form-data; boundary=XyZ", body) == ("big.png", payload)


def test_batcher_fills_batches_and_isolates_a_failing_input() -> None:
    from pvt.serve import Batcher

    seen: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        seen.append(items)
        if -1 in items:
            raise ValueError("bad input")
        return [2 * i for i in items]

    async def main() -> list[Any]:
        batcher: Batcher[int, int] = Batcher(run, max_batch=4, wait_s=0.05)
        batcher.start()
        try:
            first = await asyncio.gather(*(batcher.submit(i) for i in range(5)))
            second = await asyncio.gather(*(batcher.submit(i) for i in (7, -1, 8)), return_exceptions=True)
            return [first, second]
        finally:
            await batcher.stop()

    first, second = asyncio.run(main())
    assert first == [(0, 4), (2, 4), (4, 4), (6, 4), (8, 1)]  # a full batch at once, then the rest
    assert seen[:2] == [[0, 1, 2, 3], [4]]
    assert second[0] == (14, 1) and isinstance(second[1], ValueError) and second[2] == (16, 1)


# A real browser: Debian's chromium and chromedriver (`make browser` installs them).
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def drive_page(
    url: str,
    image: Path,
    screenshot: Path,
    min_score: str | None = None,
    script: str | None = None,
    key: str | None = None,
) -> dict[str, Any]:
    """Open the page in headless Chromium, upload ``image``, wait for the drawn result; returns what the
    page shows (and what ``script`` returns, run in the page). Also makes the README's screenshot.
    With ``key``: the page must ask for it, gets it typed in, and must not ask again after a reload."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    assert not missing, f"{', '.join(missing)} missing: run `make browser` (apt-get install chromium chromium-driver)"
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never try to download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,880"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 240)
        if key is not None:
            wait.until(lambda d: d.find_element(By.ID, "key-form").is_displayed())
            driver.find_element(By.ID, "api-key").send_keys(key)
            driver.find_element(By.ID, "key-button").click()
        wait.until(lambda d: "loading" not in d.find_element(By.ID, "model").text)
        wait.until(lambda d: "waiting for an API key" not in d.find_element(By.ID, "model").text)
        if min_score is not None:
            field = driver.find_element(By.ID, "min-score")
            field.clear()
            field.send_keys(min_score)
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait.until(lambda d: d.find_element(By.ID, "result").get_attribute("data-state") in ("done", "error"))
        driver.save_screenshot(str(screenshot))
        shown = {
            "state": driver.find_element(By.ID, "result").get_attribute("data-state"),
            "error": driver.find_element(By.ID, "error").text,
            "model": driver.find_element(By.ID, "model").text,
            "title": driver.find_element(By.ID, "result-title").text,
            "rows": [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#detections tr.detection")],
            "latency": driver.find_element(By.ID, "latency").text,
            "canvas": driver.execute_script("const c = document.getElementById('canvas'); return [c.width, c.height];"),
            "errors": [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"],
            "script": driver.execute_script(script) if script else None,
        }
        if key is not None:  # kept in the tab: a reload loads the model without asking
            driver.refresh()
            wait.until(lambda d: d.find_element(By.ID, "model").text.startswith(shown["model"][:20]))
            shown["asked_again"] = driver.find_element(By.ID, "key-form").is_displayed()
    finally:
        driver.quit()
    return shown


def test_browser_uploads_an_image_and_sees_the_detections(
    trained: Callable[[str], Path], cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = trained("retinanet")
    image = images_of("retinanet", cache, 1)[0]
    expected = predict_records(capsys, "retinanet", ckpt, [image])[0]
    # Mask R-CNN's masks arrive as COCO RLE: the page's decoder must read pycocotools' strings.
    from pycocotools import mask as mask_utils

    mask = np.random.default_rng(0).random((37, 23)) < 0.3  # not square: a transposed reading shows
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")
    flat = mask.flatten(order="F").astype(int)  # runs of 0s and 1s, column by column, 0s first
    edges = [0, *(np.flatnonzero(np.diff(flat)) + 1).tolist(), flat.size]
    runs = ([] if flat[0] == 0 else [0]) + np.diff(edges).tolist()
    with serving(ckpt, *[a for s in SERVE_SETS["retinanet"] for a in ("--set", s)]) as url:
        shown = drive_page(url, image, tmp_path / "serve-page.png", "0", f"return rleCounts({json.dumps(rle)})")
    assert shown["script"] == runs
    assert shown["state"] == "done" and not shown["error"] and not shown["errors"], shown
    assert shown["model"].startswith("detection · retinanet / pvt_v2_b0")
    n = expected["detections"]
    assert n > 0 and shown["title"] == f"{n} of {n} detections drawn (score ≥ 0)"
    # The table lists predict's detections: class names, scores (3 decimals), best first.
    meta = json.loads((ckpt.parent / "task.json").read_text())
    names = dict(zip(meta["category_ids"], meta["classes"], strict=True))
    assert len(shown["rows"]) == min(n, 50)
    for row, det in zip(shown["rows"], expected["results"], strict=False):
        label, score, _ = row.split(" ", 2)
        assert label == names[det["category_id"]] and float(score) == pytest.approx(det["score"], abs=2e-3)
    assert shown["latency"].startswith("server ") and shown["canvas"] == [512, 512]  # 64 px shown 8x
    assert Image.open(tmp_path / "serve-page.png").size[0] > 0
