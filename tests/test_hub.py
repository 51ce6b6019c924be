"""Published weights without the internet: a local HTTP server plays the Hugging Face hub and a
release host, the sources table is pointed at it, and every cache lives under tmp_path."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hf_constants
import pytest
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors_bytes

import pvt.hub.sources as sources_mod
from conftest import perturb_
from pvt import create_model
from pvt.checkpoint import CheckpointError
from pvt.cli import main as cli_main
from pvt.hub import (
    EvalTransform,
    ManualDownloadRequired,
    WeightsUnavailable,
    fetch_to,
    get_source,
    imagenet_classes,
    is_cached,
    list_sources,
    local_path,
    resolve,
)
from pvt.models import list_models

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHosts:
    """Serves ``files`` (URL path -> bytes): hub paths answer HEAD with the headers
    ``hf_hub_download`` needs (``X-Repo-Commit``, ``ETag``, ``Content-Length``); a path in ``drop``
    sends its full length header, half of the body, then closes the connection. A missing hub
    file answers 404 with the hub's ``X-Error-Code: EntryNotFound`` (without it if ``plain_404``,
    as a bare mirror would); a path in ``status`` answers with that error status instead."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop: set[str] = set()
        self.status: dict[str, int] = {}
        self.plain_404 = False
        self.requests: list[tuple[str, str]] = []
        hosts = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep pytest's output clean
                pass

            def _answer(self, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                hosts.requests.append((self.command, path))
                data = hosts.files.get(path)
                if data is None or path in hosts.status:
                    self.send_response(hosts.status.get(path, 404))
                    if path not in hosts.status and "/resolve/" in path and not hosts.plain_404:
                        self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                if path in hosts.drop:
                    self.send_header("Connection", "close")
                self.end_headers()
                if not body:
                    return
                if path in hosts.drop:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def file_requests(self) -> list[tuple[str, str]]:
        """Requests for served files (huggingface_hub also asks its endpoint for /api/ metadata)."""
        return [r for r in self.requests if not r[1].startswith("/api/")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHosts]:
    """The fake hosts, online mode, and every cache under tmp_path. huggingface_hub reads its
    environment once at import, so its constants are patched along with the variables."""
    fake = FakeHosts()
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("PVT_CACHE", str(tmp_path / "pvt"))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", fake.base)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hf_constants, "ENDPOINT", fake.base)
    monkeypatch.setattr(
        hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake.base + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(hf_home / ".agent_harnesses.json"))
    yield fake
    fake.close()


def _go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def _patch_row(monkeypatch: pytest.MonkeyPatch, name: str, **changes: Any) -> sources_mod.WeightsSource:
    """Replace one row of the sources table (``model:tag``) for this test."""
    rows = list(sources_mod.SOURCES)
    i = next(i for i, s in enumerate(rows) if s.name == name)
    rows[i] = dataclasses.replace(rows[i], **changes)
    monkeypatch.setattr(sources_mod, "SOURCES", tuple(rows))
    return rows[i]


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _official_pth(num_classes: int = 1000) -> tuple[bytes, torch.nn.Module]:
    """A perturbed pvt_v2_b0 saved as the authors' release saves it (a flat official state dict)."""
    model = perturb_(create_model("pvt_v2_b0", num_classes=num_classes)).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue(), model


def _serve_official(hosts: FakeHosts, monkeypatch: pytest.MonkeyPatch, **changes: Any) -> tuple[Any, torch.nn.Module]:
    data, model = _official_pth()
    hosts.files["/release/pvt_v2_b0.pth"] = data
    changes.setdefault("sha256", hashlib.sha256(data).hexdigest())
    row = _patch_row(monkeypatch, "pvt_v2_b0:official", location=f"{hosts.base}/release/pvt_v2_b0.pth", **changes)
    return row, model


def test_table_covers_every_model_with_one_default() -> None:
    for name in list_models():
        assert get_source(name).tag == "official", name  # the published top-1 belongs to it
        tags = [s.tag for s in list_sources(name) if s.model == name]
        assert len(tags) == len(set(tags)), name
        assert ("timm" in tags) == name.startswith("pvt_v2"), name
        assert get_source(name, "hf").eval_transform == EvalTransform(crop_pct=1.0, crop_mode="squash",
                                                                    interpolation="bilinear")  # fmt: skip
        # Hub rows ask as transformers and timm do: model.safetensors, else pytorch_model.bin.
        hub_rows = [s for s in list_sources(name) if s.model == name and s.host == "hf"]
        assert hub_rows and all(s.filenames == ("model.safetensors", "pytorch_model.bin") for s in hub_rows), name
    assert len(list_sources(task="coco")) == 9 + 2 * 11 and len(list_sources(task="ade20k")) == 4
    assert get_source("pvt_v2_b2", "coco", task="coco", arch="mask_rcnn").host == "gdrive"
    assert get_source("pvt_v2_b2", task="coco", arch="retinanet").sha256 == "529f0b9a"
    mask = get_source("pvt_v2_b2", "coco-official", task="coco", arch="mask_rcnn")
    assert (mask.tag, mask.metrics) == ("coco-mask-rcnn-official", (("box_ap", 45.3), ("mask_ap", 41.2)))
    with pytest.raises(ValueError, match=r"available tags: official .*timm .*hf"):
        get_source("pvt_v2_b0", "nope")
    assert len(imagenet_classes()) == 1000 and imagenet_classes()[0].startswith("tench")


def test_url_download_loads_then_cache_needs_no_request(hosts: FakeHosts, monkeypatch: pytest.MonkeyPatch) -> None:
    row, saved = _serve_official(hosts, monkeypatch)
    assert not is_cached(row)
    model = create_model("pvt_v2_b0", pretrained=True).eval()
    assert hosts.requests == [("GET", "/release/pvt_v2_b0.pth")]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), saved(x))
    assert model.pretrained_source == row and model.pretrained_source.eval_transform.crop_pct == 0.875
    weights = local_path(row).parent
    assert _files_under(weights) == ["pvt_v2_b0.pth", "pvt_v2_b0.pth.sha256"]  # no temporary left over
    assert is_cached(row)
    again = create_model("pvt_v2_b0", pretrained="official").eval()
    assert len(hosts.requests) == 1  # the second call is served by the cache
    with torch.no_grad():
        assert torch.equal(again(x), saved(x))
    # The cached file is checked on use: a corrupted copy is refused, not loaded.
    local_path(row).write_bytes(local_path(row).read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="does not match"):
        resolve(row)


def test_hf_download_through_huggingface_hub(hosts: FakeHosts, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    reference = perturb_(timm.create_model("pvt_v2_b0")).eval()
    data = save_safetensors_bytes({k: v.contiguous() for k, v in reference.state_dict().items()})
    hosts.files["/timm/pvt_v2_b0.in1k/resolve/main/model.safetensors"] = data
    row = _patch_row(monkeypatch, "pvt_v2_b0:timm", sha256=hashlib.sha256(data).hexdigest()[:8])
    model = create_model("pvt_v2_b0", pretrained="timm").eval()
    hub_file = "/timm/pvt_v2_b0.in1k/resolve/main/model.safetensors"
    assert hosts.file_requests() == [("HEAD", hub_file), ("GET", hub_file)]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    assert model.pretrained_source.eval_transform.crop_pct == 0.9
    assert str(resolve(row)).startswith(str(tmp_path / "hf" / "hub"))  # huggingface_hub's own cache
    n = len(hosts.requests)
    assert is_cached(row)
    create_model("pvt_v2_b0", pretrained="timm")
    assert len(hosts.requests) == n  # cached: no request at all, not even a HEAD


V1_HUB = "/Zetatech/pvt-tiny-224/resolve/main/"  # get_source("pvt_tiny", "hf")'s repository


def _pvt_tiny_hf() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A perturbed transformers ``PvtForImageClassification`` shaped as pvt_tiny: (its weights as
    this project's loader reads them, its own state dict, as a hub repository holds it)."""
    import transformers

    from pvt.bench.peers import hf_v1_config
    from pvt.checkpoint import detect_layout

    peer = perturb_(transformers.PvtForImageClassification(hf_v1_config("pvt_tiny", num_labels=1000)))
    hf = {k: v.contiguous() for k, v in peer.state_dict().items()}
    assert detect_layout(hf) == "hf_pvt"
    return create_model("pvt_tiny", checkpoint=hf).state_dict(), hf


def _torch_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def _assert_weights(model: torch.nn.Module, ref: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == ref.keys()
    assert [k for k in ref if not torch.equal(got[k], ref[k])] == []


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_hf_repo_with_one_of_the_files_loads(hosts: FakeHosts, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             filename: str) -> None:  # fmt: skip
    ref, hf = _pvt_tiny_hf()
    data = save_safetensors_bytes(hf) if filename.endswith(".safetensors") else _torch_bytes(hf)
    hosts.files[V1_HUB + filename] = data
    model = create_model("pvt_tiny", pretrained="hf")
    _assert_weights(model, ref)
    asked = ["model.safetensors", "pytorch_model.bin"][: 1 + (filename == "pytorch_model.bin")]
    assert hosts.file_requests() == [("HEAD", V1_HUB + f) for f in asked] + [("GET", V1_HUB + filename)]
    row = model.pretrained_source
    assert resolve(row).name == filename and resolve(row).read_bytes() == data
    # Cached: no request, offline either; `pvt download --to` keeps the file's own name, and such
    # a copy placed in $PVT_CACHE/weights is what resolve then uses.
    n = len(hosts.requests)
    _go_offline(monkeypatch)
    assert is_cached(row) and resolve(row).name == filename
    copy = fetch_to(row, tmp_path / "prefetched")
    assert copy.name == f"Zetatech--pvt-tiny-224--{filename}" and copy.read_bytes() == data
    assert len(hosts.requests) == n
    local_path(row).parent.mkdir(parents=True)
    copy.rename(local_path(row, filename))
    shutil.rmtree(tmp_path / "hf")
    assert resolve(row) == local_path(row, filename) and resolve(row).read_bytes() == data


def test_hf_repo_with_both_files_takes_the_safetensors(hosts: FakeHosts) -> None:
    ref, hf = _pvt_tiny_hf()
    hosts.files[V1_HUB + "model.safetensors"] = save_safetensors_bytes(hf)
    hosts.files[V1_HUB + "pytorch_model.bin"] = _torch_bytes({**hf, "classifier.bias": hf["classifier.bias"] + 1})
    model = create_model("pvt_tiny", pretrained="hf")
    _assert_weights(model, ref)
    assert hosts.file_requests() == [("HEAD", V1_HUB + "model.safetensors"), ("GET", V1_HUB + "model.safetensors")]


def test_hf_mirror_without_the_hub_error_headers_falls_back_on_its_404(hosts: FakeHosts) -> None:
    hosts.plain_404 = True  # huggingface_hub then reports a LocalEntryNotFoundError raised from the 404
    hosts.files[V1_HUB + "pytorch_model.bin"] = b"the mirror's file"
    assert resolve(get_source("pvt_tiny", "hf")).read_bytes() == b"the mirror's file"
    assert hosts.file_requests() == [("HEAD", V1_HUB + "model.safetensors"), ("HEAD", V1_HUB + "pytorch_model.bin"),
                                     ("GET", V1_HUB + "pytorch_model.bin")]  # fmt: skip


def test_hf_repo_with_neither_file_is_one_clear_error(hosts: FakeHosts) -> None:
    row = get_source("pvt_tiny", "hf")
    with pytest.raises(WeightsUnavailable) as e:
        resolve(row)
    msg = str(e.value)
    assert "Zetatech/pvt-tiny-224" in msg and "neither model.safetensors nor pytorch_model.bin" in msg, msg
    assert "404" in msg and "pvt_tiny:hf" in msg, msg
    assert hosts.file_requests() == [("HEAD", V1_HUB + "model.safetensors"), ("HEAD", V1_HUB + "pytorch_model.bin")]
    assert not is_cached(row)


@pytest.mark.parametrize("status", [401, 403])
def test_hf_errors_other_than_a_missing_file_do_not_fall_back(hosts: FakeHosts, status: int) -> None:
    hosts.files[V1_HUB + "pytorch_model.bin"] = b"never asked for"
    hosts.status[V1_HUB + "model.safetensors"] = status
    with pytest.raises(WeightsUnavailable, match="cannot be fetched"):
        resolve(get_source("pvt_tiny", "hf"))
    assert hosts.file_requests() == [("HEAD", V1_HUB + "model.safetensors")]  # the .bin was not asked for


def test_hf_fallback_file_of_a_row_with_a_checksum_warns(hosts: FakeHosts) -> None:
    row = get_source("pvt_v2_b0", "timm")
    assert (row.filename, row.sha256) == ("model.safetensors", "d0927f8c")  # the digest is the safetensors'
    data, saved = _official_pth()  # any layout loads: it is detected from the keys
    hosts.files["/timm/pvt_v2_b0.in1k/resolve/main/pytorch_model.bin"] = data
    with pytest.warns(UserWarning, match=r"sha256 \(d0927f8c\) is that of model\.safetensors and was not checked"):
        model = create_model("pvt_v2_b0", pretrained="timm")
    _assert_weights(model, saved.state_dict())
    assert resolve(row).name == "pytorch_model.bin"


def test_checksum_mismatch_is_refused_and_leaves_nothing(hosts: FakeHosts, monkeypatch: pytest.MonkeyPatch) -> None:
    row, _ = _serve_official(hosts, monkeypatch, sha256="0" * 64)
    with pytest.raises(CheckpointError, match="not the published file") as e:
        create_model("pvt_v2_b0", pretrained=True)
    assert not isinstance(e.value, WeightsUnavailable)
    assert _files_under(local_path(row).parent) == []
    # The same through the hub client: the bad blob is taken out of its cache.
    hosts.files["/timm/pvt_v2_b0.in1k/resolve/main/model.safetensors"] = b"not these weights"
    hf_row = _patch_row(monkeypatch, "pvt_v2_b0:timm", sha256="d0927f8c")
    with pytest.raises(CheckpointError, match="not the published file"):
        resolve(hf_row)
    assert not is_cached(hf_row)


@pytest.mark.parametrize("checksum", [True, False], ids=["with-sha256", "no-sha256"])
def test_dropped_connection_leaves_nothing(hosts: FakeHosts, monkeypatch: pytest.MonkeyPatch, checksum: bool) -> None:
    row, _ = _serve_official(hosts, monkeypatch, **({} if checksum else {"sha256": None}))
    hosts.drop.add("/release/pvt_v2_b0.pth")
    with pytest.raises(WeightsUnavailable, match="cut short"):
        resolve(row)
    assert _files_under(local_path(row).parent) == []
    hosts.drop.clear()  # the host recovers: the next call downloads the whole file
    assert resolve(row).is_file()


def test_offline_with_empty_cache_is_one_clear_error(hosts: FakeHosts, monkeypatch: pytest.MonkeyPatch) -> None:
    row, _ = _serve_official(hosts, monkeypatch)
    _go_offline(monkeypatch)
    for source in (row, get_source("pvt_v2_b0", "timm"), get_source("pvt_tiny", "hf")):
        with pytest.raises(WeightsUnavailable) as e:
            resolve(source)
        msg = str(e.value)
        assert source.filename in msg and source.url in msg and str(local_path(source)) in msg, msg
        assert all(f in msg and str(local_path(source, f)) in msg for f in source.filenames), msg
        assert "HF_HUB_OFFLINE" in msg
    assert hosts.requests == []
    # A copy placed there by hand is then used, offline.
    local_path(row).parent.mkdir(parents=True)
    local_path(row).write_bytes(hosts.files["/release/pvt_v2_b0.pth"])
    assert resolve(row) == local_path(row)


def test_unreachable_host_is_the_same_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PVT_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    fake = FakeHosts()
    fake.close()  # nothing listens on its port any more
    row = _patch_row(monkeypatch, "pvt_v2_b0:official", location=f"{fake.base}/release/pvt_v2_b0.pth")
    with pytest.raises(WeightsUnavailable, match=r"cannot be fetched from http://127\.0\.0\.1"):
        resolve(row)
    assert _files_under(tmp_path) == []


def test_google_drive_rows_say_where_to_get_and_put_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PVT_CACHE", str(tmp_path))
    row = get_source("pvt_small", "ade20k-official", task="ade20k")
    with pytest.raises(ManualDownloadRequired) as e:
        resolve(row)
    msg = str(e.value)
    assert "Google Drive" in msg and "github.com/whai362/PVT" in msg and str(local_path(row)) in msg
    assert "checkpoint=FILE" in msg
    local_path(row).parent.mkdir(parents=True)
    local_path(row).write_bytes(b"placed by hand")
    assert resolve(row) == local_path(row)
    mask = get_source("pvt_large", "coco-mask-rcnn-official", task="coco")
    with pytest.raises(ManualDownloadRequired, match="README error"):
        resolve(mask)


def test_cli_weights_and_download(hosts: FakeHosts, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    _serve_official(hosts, monkeypatch)
    assert cli_main(["weights", "pvt_v2_b0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "task", "arch", "host", "metric", "cached"]
    official = next(line for line in lines if line.startswith("pvt_v2_b0:official "))
    assert "top-1 70.5" in official and official.split()[-1] == "no"
    assert any(line.startswith("pvt_v2_b0:coco ") and "box AP 37.1" in line for line in lines)
    out = tmp_path / "prefetched"
    assert cli_main(["download", "pvt_v2_b0", "pvt_small:ade20k-official", "--to", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "manual: pvt_small:ade20k-official" in printed and f"pvt_v2_b0:official: {out}" in printed
    assert (out / "pvt_v2_b0.pth").read_bytes() == hosts.files["/release/pvt_v2_b0.pth"]
    assert cli_main(["weights", "pvt_v2_b0:official"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "yes"
    assert cli_main(["download", "pvt_v2_b0:nope"]) == 2
    assert "available tags" in capsys.readouterr().err


def test_predict_pretrained_uses_the_source_transform_and_imagenet_names(
    hosts: FakeHosts, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pvt.classification.task as cls_task

    transform = EvalTransform(input_size=96, crop_pct=1.0, crop_mode="squash", interpolation="bilinear",
                              mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # fmt: skip
    _, saved = _serve_official(hosts, monkeypatch, eval_transform=transform)
    seen: list[Any] = []
    build = cls_task.build_transforms

    def spy(cfg: Any, *, train: bool) -> Any:
        seen.append(cfg)
        return build(cfg, train=train)

    monkeypatch.setattr(cls_task, "build_transforms", spy)
    image = tmp_path / "photo.png"
    Image.new("RGB", (120, 80), (200, 30, 60)).save(image)
    args = ["predict", "classification", "--model", "pvt_v2_b0", "--pretrained", str(image)]
    assert cli_main(args) == 0
    pred = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = seen[-1]
    assert (cfg.input_size, cfg.crop_pct, cfg.crop_mode, cfg.interpolation) == (96, 1.0, "squash", "bilinear")
    assert (cfg.mean, cfg.std) == (transform.mean, transform.std)
    names = imagenet_classes()
    assert [t["label"] for t in pred["top5"]] == [names[t["index"]] for t in pred["top5"]]
    x = build(cfg, train=False)(Image.open(image).convert("RGB"))[None]
    with torch.no_grad():
        expected = saved(x).softmax(-1)[0].topk(5).indices.tolist()
    assert [t["index"] for t in pred["top5"]] == expected
    # The tag spelled out, and the image first: the same answer.
    assert cli_main(["predict", "classification", str(image), "--model", "pvt_v2_b0", "--pretrained", "official"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == pred
    # Fine-tuned weights of another class count keep the recipe's own transform.
    recipe_default = cls_task.ClassificationData()
    from pvt.engine import load_recipe

    r = load_recipe("classification", cls_task.ClassificationData, None,
                    ["model.name=pvt_v2_b0", "model.pretrained=true", "model.num_classes=10"])  # fmt: skip
    assert cls_task.eval_data(r) == recipe_default


def test_pretrained_and_checkpoint_together_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"either pretrained= .* or checkpoint="):
        create_model("pvt_v2_b0", pretrained=True, checkpoint=tmp_path / "x.pth")
    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(image)
    assert cli_main(["predict", "classification", "--checkpoint", "x.pth", "--pretrained", str(image)]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli_main(["predict", "classification", str(image)]) == 2
    assert "--pretrained" in capsys.readouterr().err


def test_dense_builders_take_the_imagenet_backbone(hosts: FakeHosts, monkeypatch: pytest.MonkeyPatch) -> None:
    from pvt.engine import load_recipe
    from pvt.segmentation.models import semantic_fpn
    from pvt.tasks import get_task

    _, saved = _serve_official(hosts, monkeypatch)
    model = semantic_fpn("pvt_v2_b0", 4, backbone_pretrained=True, fpn_channels=32, head_channels=16)
    body = model.backbone.body.state_dict()
    ref = saved.state_dict()
    assert body and all(torch.equal(v, ref[k]) for k, v in body.items())
    with pytest.raises(ValueError, match="either backbone_checkpoint"):
        semantic_fpn("pvt_v2_b0", 4, backbone_pretrained=True, backbone_checkpoint="x.pth")
    for name in ("detection", "segmentation"):
        task = get_task(name)
        r = load_recipe(name, task.data_config, None, ["model.backbone_pretrained=timm"], model_cls=task.model_config)
        assert r.model.backbone_pretrained == "timm"
