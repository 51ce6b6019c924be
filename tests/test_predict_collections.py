"""Prediction over whole collections (``pvt predict`` / ``pvt.predict``): every kind of input in one
deterministic order, images read as a person sees them, batched forwards equal to one-by-one ones
for every task, unreadable images recorded while the run goes on, resume after SIGKILL (torn line
included), torchrun shards merged, Parquet beside JSONL."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import pvt
from conftest import perturb_
from pvt.checkpoint import save_safetensors
from pvt.cli import main as cli_main
from pvt.detection import retinanet
from pvt.engine import load_recipe
from pvt.inference import ImageError, collect, decode_image, predict
from pvt.inference.store import read_records
from pvt.tasks import get_task

REPO = Path(__file__).resolve().parent.parent
SMALL_CLASSIFIER = ["model.name=pvt_v2_b0", "model.num_classes=5", "data.input_size=64", "data.crop_pct=1.0"]


def _png(path: Path, size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _classifier_run(root: Path) -> Path:
    """A run folder as ``pvt train`` leaves it, for a small untrained classifier."""
    task = get_task("classification")
    recipe = load_recipe("classification", task.data_config, {}, SMALL_CLASSIFIER, model_cls=task.model_config)
    root.mkdir(parents=True, exist_ok=True)
    recipe.dump(root / "config.yaml")
    (root / "task.json").write_text(json.dumps({"classes": ["a", "b", "c", "d", "e"]}))
    torch.manual_seed(0)
    save_safetensors(task.build_model(recipe).state_dict(), root / "model.safetensors", arch="pvt_v2_b0")
    return root / "model.safetensors"


def _records(path: Path) -> dict[str, dict[str, Any]]:
    records = list(read_records(path))
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "duplicate records"
    return {r["id"]: r for r in records}


def test_inputs_in_one_order_with_stable_ids(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    for name in ("b.png", "a.png", "sub/c.jpg"):
        _png(folder / name)
    (folder / "notes.txt").write_text("not an image")
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("x.png", "y.txt"):
            data = io.BytesIO()
            Image.new("RGB", (8, 8)).save(data, "PNG") if name.endswith(".png") else data.write(b"text")
            info = tarfile.TarInfo(name)
            info.size = len(data.getvalue())
            tar.addfile(info, io.BytesIO(data.getvalue()))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{_png(tmp_path / 'listed.png')}\n\n")
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 42, "file_name": "a.png"}]}))
    items = collect([str(folder), str(shard)], inputs_from=str(listing))
    assert [i.id for i in items] == ["a.png", "b.png", "sub/c.jpg", "shard.tar/x.png", str(tmp_path / "listed.png")]
    assert [i.index for i in items] == list(range(5))
    (coco_item,) = collect(coco_json=str(coco), images=str(folder))
    assert coco_item.id == "a.png" and coco_item.coco_id == 42 and coco_item.path == str(folder / "a.png")
    with pytest.raises(ValueError, match=r"a\.png: given twice"):
        collect([str(folder)], coco_json=str(coco), images=str(folder))
    with pytest.raises(FileNotFoundError, match=r"missing\.png: no such image file"):
        collect([str(tmp_path / "missing.png")])


def test_images_are_read_as_a_person_sees_them() -> None:
    def encoded(im: Image.Image, fmt: str, **kw: Any) -> bytes:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    wide = Image.new("RGB", (60, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 20))  # a blue left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    stored = wide.transpose(Image.Transpose.ROTATE_90)  # 20 x 60 as stored
    upright = decode_image(encoded(stored, "JPEG", exif=exif.tobytes(), quality=95), "rotated.jpg")
    assert upright.size == (60, 20) and upright.getpixel((2, 10))[2] > 200  # blue on the left again
    grey16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert decode_image(encoded(grey16, "PNG"), "16bit.png").getpixel((0, 0)) == (255, 255, 255)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(encoded(rgba, "PNG"), "clear.png").getpixel((0, 0)) == (255, 255, 255)
    for mode in ("L", "P", "CMYK"):
        assert decode_image(encoded(Image.new(mode, (4, 4)), "TIFF"), f"{mode}.tif").mode == "RGB"
    for data, why in [(b"", "empty file"), (b"hello", "not an image"), (encoded(wide, "PNG")[:60], "truncated")]:
        with pytest.raises(ImageError, match=f"bad.png: {why}"):
            decode_image(data, "bad.png")


def test_bad_files_are_recorded_while_the_run_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = _classifier_run(tmp_path / "run")
    folder = tmp_path / "in"
    for i in range(5):
        _png(folder / f"good{i}.png", seed=i)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    (folder / "cut.png").write_bytes((folder / "good0.png").read_bytes()[:80])
    out = tmp_path / "out"
    args = ["predict", "classification", "--checkpoint", str(weights), str(folder), "--out", str(out),
            "--batch-size", "2", "--workers", "2"]  # fmt: skip
    assert cli_main(args) == 1  # some images could not be read: the status says so
    summary = capsys.readouterr().err
    assert "5 images, 3 errors" in summary and "predictions.jsonl" in summary
    records = _records(out / "predictions.jsonl")
    assert sorted(records) == [f"good{i}.png" for i in range(5)]
    assert all(len(r["top5"]) == 5 and r["image"] == str(folder / r["id"]) for r in records.values())
    errors = _records(out / "errors.jsonl")
    assert errors["empty.png"]["error"] == "empty.png: empty file"
    assert "not an image" in errors["text.jpg"]["error"] and "truncated" in errors["cut.png"]["error"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "classification" and manifest["images"] == 8 and len(manifest["weights_sha256"]) == 64
    # --on-error stop ends at the first, naming it; a used folder needs --resume
    assert cli_main([*args[:-6], "--out", str(tmp_path / "out2"), "--on-error", "stop"]) == 2
    assert "cut.png: truncated or corrupt image" in capsys.readouterr().err
    assert cli_main(args) == 2
    assert "already holds predictions" in capsys.readouterr().err


def test_parquet_holds_the_same_records(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    weights = _classifier_run(tmp_path / "run")
    images = [str(_png(tmp_path / f"{i}.png", seed=i)) for i in range(3)]
    out = tmp_path / "out"
    args = [
        "predict",
        "classification",
        "--checkpoint",
        str(weights),
        *images,
        "--out",
        str(out),
        "--format",
        "parquet",
    ]
    assert cli_main([*args, "--workers", "0"]) == 0
    table = pq.read_table(out / "predictions.parquet").to_pylist()
    jsonl = _records(out / "predictions.jsonl")
    assert {r["id"]: json.loads(r["top5"]) for r in table} == {k: r["top5"] for k, r in jsonl.items()}


def _same(a: dict[str, Any], b: dict[str, Any], path: str = "") -> None:
    """Records equal: numbers within 1e-3 (boxes in px) / 1e-4 (scores, shares), the rest exactly."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-3 if "bbox" in path else 1e-4), path
    else:
        assert a == b, path


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_batched_equals_one_by_one(task: str, tmp_path: Path) -> None:
    """Sizes whose resized (detection) or test-time (segmentation) sizes agree share a batch."""
    torch.manual_seed(0)
    if task == "classification":
        model: torch.nn.Module = pvt.create_model("pvt_v2_b0", num_classes=5)
    elif task == "detection":
        model = pvt.detection.retinanet("pvt_v2_b0", num_classes=3, min_size=64, max_size=96, score_thresh=0.0)
    else:
        model = pvt.segmentation.semantic_fpn("pvt_v2_b0", num_classes=4)
    sizes = [(64, 48), (96, 72), (64, 48), (40, 70), (128, 96), (48, 64)]
    images = [str(_png(tmp_path / f"{i}.png", size, seed=i)) for i, size in enumerate(sizes)]
    one = list(pvt.predict(model, images, batch_size=1))
    batched = list(pvt.predict(model, images, batch_size=4, workers=2))
    assert sorted(r["id"] for r in batched) == sorted(Path(i).name for i in images)
    by_id = {r["id"]: r for r in batched}
    for r in one:
        if task == "detection":  # random weights score near ties: match detections, not their order
            _same_detections(r, by_id[r["id"]])
        else:
            _same(r, by_id[r["id"]])


def _same_detections(a: dict[str, Any], b: dict[str, Any]) -> None:
    """The same number of detections, and each of ``a``'s 50 best has a twin in ``b``: the same
    class, its box within 1e-3 px and its score within 1e-4."""
    assert a["detections"] == b["detections"] > 0 and a.keys() == b.keys()
    for d in a["results"][:50]:
        twins = [
            e for e in b["results"]
            if e["category_id"] == d["category_id"] and abs(e["score"] - d["score"]) <= 1e-4
            and max(abs(x - y) for x, y in zip(e["bbox"], d["bbox"], strict=True)) <= 1e-3
        ]  # fmt: skip
        assert twins, d


@pytest.mark.parametrize("orientation", [6, 8])
def test_an_exif_rotated_jpeg_gives_boxes_as_a_person_sees_it(orientation: int, tmp_path: Path) -> None:
    """A JPEG whose pixels are stored turned, with an EXIF Orientation that turns them back, gives a
    detector's boxes in the upright frame: those of the same decoded pixels turned upright by numpy
    and saved losslessly (the very input a viewer shows, with no second JPEG encoding between them).
    Read without its orientation the image would be portrait, its boxes in another frame."""
    rng = np.random.default_rng(orientation)
    blocks = rng.integers(0, 120, (8, 12, 3), dtype=np.uint8)  # 8 px tiles: JPEG keeps them nearly intact
    upright = blocks.repeat(8, axis=0).repeat(8, axis=1)  # 96 x 64, landscape
    upright[8:40, 56:90] = (250, 220, 30)  # an object right of centre: turned, it would move
    turn = 1 if orientation == 6 else -1  # 6: stored turned a quarter counter-clockwise; 8: clockwise
    exif = Image.Exif()
    exif[0x0112] = orientation
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(np.rot90(upright, turn).copy()).save(jpeg, quality=95, subsampling=0, exif=exif.tobytes())
    with Image.open(jpeg) as im:
        assert im.getexif()[0x0112] == orientation and im.size == (64, 96)  # portrait as stored
        stored = np.asarray(im.convert("RGB"))
    seen = np.rot90(stored, -turn)  # what a viewer shows: the decoded pixels turned back
    assert seen.shape == upright.shape and np.abs(seen.astype(int) - upright).mean() < 2  # the upright photo
    png = tmp_path / "seen.png"
    Image.fromarray(np.ascontiguousarray(seen)).save(png)
    torch.manual_seed(0)
    detector = retinanet("pvt_v2_b0", num_classes=3, fpn_channels=16, min_size=64, max_size=96, score_thresh=0.0)
    perturb_(detector, 0.05)  # off the near-tied scores of fresh weights
    got, want = predict(detector, [str(jpeg), str(png)], batch_size=1)
    assert got["id"] == "photo.jpg" and want["id"] == "seen.png"
    _same_detections(want, got)
    boxes = np.array([d["bbox"] for d in got["results"]])  # COCO [x, y, w, h]
    assert (boxes[:, 0] + boxes[:, 2]).max() > 64.5  # reaching past a portrait's width: the landscape frame


def _predict_cmd(weights: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pvt.cli", "predict", "classification", "--checkpoint", str(weights), str(folder),
            "--out", str(out), "--batch-size", "2", "--workers", "0", *extra]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    weights = _classifier_run(tmp_path / "run")
    folder = tmp_path / "in"
    for i in range(24):
        _png(folder / f"{i:02d}.png", seed=i)
    ref = tmp_path / "ref"
    subprocess.run(_predict_cmd(weights, folder, ref), env=_env(), check=True, timeout=600, capture_output=True)
    out = tmp_path / "out"
    proc = subprocess.Popen(_predict_cmd(weights, folder, out), env=_env(), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _lines(out / "predictions.jsonl") < 6 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    written = _lines(out / "predictions.jsonl")
    assert 6 <= written < 24, f"{written} records before the kill"
    with (out / "predictions.jsonl").open("ab") as f:
        f.write(b'{"id": "torn')  # a line cut by the kill
    done = subprocess.run(_predict_cmd(weights, folder, out, "--resume"), env=_env(), timeout=600, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"({written} already done)" in done.stderr
    got, want = _records(out / "predictions.jsonl"), _records(ref / "predictions.jsonl")
    assert got.keys() == want.keys()
    for k in want:
        _same(got[k], want[k])
    # another model than the manifest's is refused
    other = _classifier_run(tmp_path / "other")
    save_safetensors({k: v + 1 for k, v in pvt.checkpoint.read_checkpoint(other)[0].items()}, other, arch="pvt_v2_b0")
    refused = subprocess.run(_predict_cmd(other, folder, out, "--resume"), env=_env(), timeout=600,
                             capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and "was predicted with another setup (weights_sha256" in refused.stderr


def _torchrun(weights: Path, folder: Path, out: Path, *extra: str) -> list[str]:
    cmd = _predict_cmd(weights, folder, out, *extra)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", *cmd[2:]]


def test_torchrun_shards_merge_into_one_run_and_resume_after_a_rank_dies(tmp_path: Path) -> None:
    weights = _classifier_run(tmp_path / "run")
    folder = tmp_path / "in"
    for i in range(12):
        _png(folder / f"{i:02d}.png", seed=i)
    ref = tmp_path / "ref"
    subprocess.run(_predict_cmd(weights, folder, ref), env=_env(), check=True, timeout=600, capture_output=True)
    out = tmp_path / "out"
    done = subprocess.run(_torchrun(weights, folder, out), env=_env(), timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["errors.jsonl", "manifest.json", "predictions.jsonl"]
    got, want = _records(out / "predictions.jsonl"), _records(ref / "predictions.jsonl")
    assert got.keys() == want.keys()
    for k in want:
        _same(got[k], want[k])
    # A rank's part left by a failed run (a torn line at its end), resumed by one process.
    broken = tmp_path / "broken"
    shutil_copy = (ref / "manifest.json").read_text()
    broken.mkdir()
    (broken / "manifest.json").write_text(shutil_copy)
    lines = (ref / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    (broken / "predictions.part-1.jsonl").write_bytes(b"".join(lines[:4]) + lines[4][:20])
    resumed = subprocess.run(_predict_cmd(weights, folder, broken, "--resume"), env=_env(), timeout=600,
                             capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(broken.glob("*.part-*"))
    got = _records(broken / "predictions.jsonl")
    assert got.keys() == want.keys()


def _workers(launcher: subprocess.Popen[bytes]) -> dict[int, int]:
    """The torchrun launcher's worker processes, rank -> pid (their parent and ``RANK`` read from
    /proc: torchrun starts each in its own session, so a signal to the launcher's group misses them)."""
    found: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0") if ppid == launcher.pid else []
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not ours to read
        found |= {int(kv[5:]): int(stat.parent.name) for kv in env if kv.startswith(b"RANK=")}
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds torchrun's ranks in /proc")
def test_torchrun_resume_after_one_live_rank_is_sigkilled(tmp_path: Path) -> None:
    """Two torchrun ranks predict; rank 1 is SIGKILLed once its part holds 20 of its 80 records (the
    launcher then stops rank 0 itself); --resume under 2 ranks, and in one process on a copy of the
    folder, ends with an uninterrupted run's records: every id once, equal values."""
    weights = _classifier_run(tmp_path / "run")
    folder = tmp_path / "in"
    n = 160  # ~10 ms an image and rank: 80 each, so the kill lands well before a rank is through
    for i in range(n):
        _png(folder / f"{i:03d}.png", seed=i)
    ref = tmp_path / "ref"
    subprocess.run(_predict_cmd(weights, folder, ref, "--batch-size", "1"), env=_env(), check=True, timeout=300,
                   capture_output=True)  # fmt: skip
    want = _records(ref / "predictions.jsonl")
    assert len(want) == n
    out = tmp_path / "out"
    launcher = subprocess.Popen(_torchrun(weights, folder, out, "--batch-size", "1"), env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    part1 = out / "predictions.part-1.jsonl"
    try:
        deadline = time.monotonic() + 180
        while _lines(part1) < 20 and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        ranks = _workers(launcher)
        assert sorted(ranks) == [0, 1], f"torchrun's workers: {ranks} (launcher exit {launcher.poll()})"
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = _lines(part1)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:  # the test failed first: stop the launcher, which stops its ranks
            launcher.terminate()
            launcher.wait(timeout=60)
    assert launcher.returncode != 0 and b"Signal 9 (SIGKILL)" in err, err[-3000:]
    assert 20 <= killed_at < n // 2, f"rank 1 had {killed_at} of its {n // 2} records when killed"
    assert not (out / "predictions.jsonl").exists()  # no merge: the run did not finish
    parts = sorted(out.glob("predictions.part-*.jsonl"))
    done = sum(_lines(p) for p in parts)  # complete records; a torn last line is cut on resume
    assert [p.name for p in parts] == ["predictions.part-0.jsonl", "predictions.part-1.jsonl"] and done < n
    alone = tmp_path / "alone"
    shutil.copytree(out, alone)
    for folder_out, cmd in [
        (out, _torchrun(weights, folder, out, "--batch-size", "1", "--resume")),
        (alone, _predict_cmd(weights, folder, alone, "--batch-size", "1", "--resume")),
    ]:
        resumed = subprocess.run(cmd, env=_env(), timeout=300, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"{n - done} images, 0 errors" in resumed.stderr and f"({done} already done)" in resumed.stderr
        assert sorted(p.name for p in folder_out.glob("*.jsonl")) == ["errors.jsonl", "predictions.jsonl"]
        got = _records(folder_out / "predictions.jsonl")  # duplicates fail here
        assert got.keys() == want.keys()
        for k in want:
            _same(got[k], want[k])


def test_predict_inside_inference_mode(tmp_path: Path) -> None:
    model = pvt.create_model("pvt_v2_b0", num_classes=5).eval()
    images = [str(_png(tmp_path / f"{i}.png", seed=i)) for i in range(3)]
    outside = list(pvt.predict(model, images, batch_size=2))
    with torch.inference_mode():
        ready = pvt.optimize_for_inference(model, "fp32")
        inside = list(pvt.predict(ready, images, batch_size=2, workers=1))
    assert [r["id"] for r in inside] == [r["id"] for r in outside]
    for a, b in zip(inside, outside, strict=True):
        _same(a, b)
