"""Prediction on Ray Data (``pvt.inference.RayPredictor``, ``pvt predict --engine ray``) on a local
Ray instance with 2 CPUs: the records equal the single-process run's, unreadable images become
error rows, and the run folder (journals, manifest, resume, Parquet) is the pytorch engine's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import pvt
import pvt.inference
from conftest import perturb_
from pvt.checkpoint import save_safetensors
from pvt.cli import main as cli_main
from pvt.engine import load_recipe
from pvt.inference.store import read_records
from pvt.tasks import get_task
from test_predict_collections import _classifier_run, _png, _same

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance for the module (2 CPUs, no dashboard), shut down at its end."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "duplicate records"
    return {r["id"]: r for r in records}


def _inputs(folder: Path, n: int = 7) -> list[Path]:
    """``n`` PNGs of several sizes, and one file that is not an image."""
    paths = [_png(folder / f"img{i}.png", (40 + 8 * i, 30 + 4 * (i % 3)), seed=i) for i in range(n)]
    (folder / "broken.png").write_bytes(b"not an image")
    return paths


def test_cli_starts_and_stops_its_own_local_ray(tmp_path: Path) -> None:
    """Without a Ray in the process, ``--engine ray`` starts a local instance and shuts it down;
    without ``--out`` the records go to stdout. (First: before the module's own Ray starts.)"""
    weights = _classifier_run(tmp_path / "run")
    images = [str(_png(tmp_path / "in" / f"{i}.png", seed=i)) for i in range(3)]
    cmd = [sys.executable, "-m", "pvt.cli", "predict", "classification", "--checkpoint", str(weights), *images,
           "--engine", "ray"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    records = _by_id([json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")])
    expected = _by_id(list(pvt.predict(weights, images)))
    assert records.keys() == expected.keys()
    for k in expected:
        _same(records[k], expected[k])
    assert "pvt predict: 3 images, 0 errors" in done.stderr


def test_map_batches_gives_the_records_of_one_process(local_ray: None, tmp_path: Path) -> None:
    weights = _classifier_run(tmp_path / "run")
    paths = _inputs(tmp_path / "in")
    expected = _by_id(list(pvt.predict(weights, [str(p) for p in paths], batch_size=1)))
    rows = [{"id": p.name, "name": str(p), "index": i, "bytes": p.read_bytes()} for i, p in enumerate(paths)]
    rows.insert(3, {"id": "broken.png", "name": "broken.png", "index": 99, "bytes": b"not an image"})
    ds = ray.data.from_items(rows).map_batches(
        pvt.inference.RayPredictor,
        fn_constructor_kwargs={"checkpoint": str(weights)},
        batch_size=4,
        concurrency=2,
    )
    out = ds.take_all()
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)
    bad = [r for r in out if r["error"] is not None and r["error"] == r["error"]]  # NaN: an all-null block
    assert [(r["id"], r["record"]) for r in bad] == [("broken.png", None)]
    assert bad[0]["error"].startswith("broken.png: not an image")
    got = _by_id([json.loads(r["record"]) for r in out if r["id"] != "broken.png"])
    assert got.keys() == expected.keys()
    for k in expected:
        _same(got[k], expected[k])


def test_arrays_and_bytes_give_the_same_records(tmp_path: Path) -> None:
    """The predictor in this process (no Ray needed to call it): ``image`` arrays (RGB, grey,
    RGBA over white) and ``bytes`` give the same records; a wrong array is an error row."""
    weights = _classifier_run(tmp_path / "run")
    paths = _inputs(tmp_path / "in", n=3)
    predictor = pvt.inference.RayPredictor(checkpoint=str(weights), threads=None)
    ids = np.array([p.name for p in paths], dtype=object)
    from_bytes = predictor({"id": ids, "bytes": np.array([p.read_bytes() for p in paths], dtype=object)})
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    arrays[1] = np.dstack([arrays[1], np.full(arrays[1].shape[:2], 255, np.uint8)])  # opaque RGBA
    grey = np.asarray(Image.open(paths[2]).convert("L"))
    arrays[2] = grey
    as_arrays = np.empty(len(arrays) + 1, dtype=object)
    as_arrays[:] = [*arrays, np.zeros((4, 4), np.float32)]
    from_arrays = predictor({"id": np.array([*ids, "wrong"], dtype=object), "image": as_arrays})
    assert from_bytes["error"] == [None] * 3 and from_arrays["error"][:3] == [None] * 3
    assert "wrong: not an image array" in from_arrays["error"][3] and from_arrays["record"][3] is None
    for k in range(2):
        _same(json.loads(from_arrays["record"][k]), json.loads(from_bytes["record"][k]))
    grey_bytes = Image.fromarray(grey).convert("RGB")
    expected = predictor({"id": ids[2:], "image": np.asarray(grey_bytes)[None]})
    _same(json.loads(from_arrays["record"][2]), json.loads(expected["record"][0]))
    with pytest.raises(ValueError, match="int8"):
        pvt.inference.RayPredictor(checkpoint=str(weights), precision="int8")


def test_detector_boxes_and_image_ids_equal_one_process(tmp_path: Path) -> None:
    """A detector (weights perturbed off their near-tied initial scores) through the predictor in
    this process: batches grouped by resized size give one-by-one's boxes (1e-3 px), scores
    (1e-4) and image ids (``index`` + 1)."""
    task = get_task("detection")
    sets = ["model.name=pvt_v2_b0", "model.num_classes=3", "model.fpn_channels=16", "model.min_size=[64]",
            "model.max_size=96", "model.score_thresh=0.0"]  # fmt: skip
    recipe = load_recipe("detection", task.data_config, {}, sets, model_cls=task.model_config)
    run = tmp_path / "run"
    run.mkdir()
    recipe.dump(run / "config.yaml")
    save_safetensors(perturb_(task.build_model(recipe), 0.05).state_dict(), run / "model.safetensors", arch="pvt_v2_b0")
    sizes = [(64, 48), (96, 72), (64, 48), (40, 70), (128, 96)]
    paths = [_png(tmp_path / "in" / f"{i}.png", size, seed=i) for i, size in enumerate(sizes)]
    expected = _by_id(list(pvt.predict(run / "model.safetensors", [str(p) for p in paths], batch_size=1)))
    predictor = pvt.inference.RayPredictor(checkpoint=str(run / "model.safetensors"), threads=None)
    batch = {
        "id": np.array([p.name for p in paths], dtype=object),
        "name": np.array([str(p) for p in paths]),
        "index": np.arange(len(paths)),
        "bytes": np.array([p.read_bytes() for p in paths], dtype=object),
    }
    got = predictor(batch)
    assert got["error"] == [None] * len(paths)
    for record in map(json.loads, got["record"]):
        want = expected[record["id"]]
        assert record["detections"] == want["detections"] > 0 and record.keys() == want.keys()
        for d in want["results"][:50]:
            assert any(
                e["category_id"] == d["category_id"] and e["image_id"] == d["image_id"]
                and abs(e["score"] - d["score"]) <= 1e-4
                and max(abs(x - y) for x, y in zip(e["bbox"], d["bbox"], strict=True)) <= 1e-3
                for e in record["results"]
            ), d  # fmt: skip


def _cli(weights: Path, inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", "classification", "--checkpoint", str(weights), str(inputs), "--out", str(out),
            "--batch-size", "2", *extra]  # fmt: skip


def test_cli_ray_engine_writes_the_pytorch_engines_run_folder(
    local_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    weights = _classifier_run(tmp_path / "run")
    folder = tmp_path / "in"
    _inputs(folder)
    torch_out, ray_out = tmp_path / "torch", tmp_path / "ray"
    assert cli_main(_cli(weights, folder, torch_out, "--workers", "0")) == 1  # 1: an image could not be read
    capsys.readouterr()
    assert cli_main(_cli(weights, folder, ray_out, "--engine", "ray", "--actors", "2", "--format", "parquet")) == 1
    err = capsys.readouterr().err
    assert "pvt predict: 7 images, 1 errors" in err and "predictions.parquet" in err
    assert sorted(p.name for p in ray_out.iterdir()) == [
        "errors.jsonl", "manifest.json", "predictions.jsonl", "predictions.parquet"]  # fmt: skip
    expected = _by_id(list(read_records(torch_out / "predictions.jsonl")))
    got = _by_id(list(read_records(ray_out / "predictions.jsonl")))
    assert got.keys() == expected.keys() and len(got) == 7
    for k in expected:
        _same(got[k], expected[k])
    assert list(read_records(ray_out / "errors.jsonl")) == list(read_records(torch_out / "errors.jsonl"))
    table = pq.read_table(ray_out / "predictions.parquet").to_pylist()
    assert {r["id"]: json.loads(r["top5"]) for r in table} == {k: r["top5"] for k, r in got.items()}
    manifest = json.loads((ray_out / "manifest.json").read_text())
    assert manifest["engine"] == "ray" and manifest["images"] == 8

    # refused combinations name what to do instead
    for extra, why in [(("--save-pictures",), "--save-pictures"), (("--precision", "int8"), "int8")]:
        assert cli_main(_cli(weights, folder, tmp_path / "x", "--engine", "ray", *extra)) == 2
        assert why in capsys.readouterr().err

    # resume: a run cut after three records (and a torn fourth line) goes on to the same records;
    # the pytorch engine's folder resumed by the ray engine, so the two share one layout.
    lines = (torch_out / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    (torch_out / "predictions.jsonl").write_bytes(b"".join(lines[:3]) + lines[3][:20])
    (torch_out / "errors.jsonl").unlink()
    assert cli_main(_cli(weights, folder, torch_out, "--engine", "ray", "--resume")) == 1
    assert "(3 already done)" in capsys.readouterr().err
    resumed = _by_id(list(read_records(torch_out / "predictions.jsonl")))
    assert resumed.keys() == expected.keys()
    for k in expected:
        _same(resumed[k], expected[k])
