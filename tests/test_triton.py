"""``pvt export --format triton``: the model repository's ``config.pbtxt`` parsed with Triton's own
schema (``tritonclient``'s ``model_config_pb2``) and checked against the ONNX graph beside it, and,
where the ``nvidia-pytriton`` wheel's ``tritonserver`` is installed, a real server answering a real
client with what ONNX Runtime and PyTorch compute.

Three small models: a classifier exported by the command from a run folder (its class names and
evaluation transform come from the run), a Semantic FPN on ResNet-18 and a RetinaNet, both through
``pvt.deploy.triton.export_triton``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import pvt
from conftest import perturb_, stop_process
from pvt.cli import main as cli_main
from pvt.deploy import ExportError
from pvt.deploy.triton import export_triton, triton_type, write_config

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

torch.set_flush_denormal(True)  # random weights: keeps denormal-heavy activations fast

# Names a text-format writer must escape (quotes, a backslash) and one beyond ASCII.
CLASSES = ['a "quoted" ant', "back\\slash bee", "café"]
DETECTOR_CLASSES = ["circle", "square", "star"]
# ONNX element types these models use, and the Triton data type each must become.
TYPES = {"FLOAT": "TYPE_FP32", "INT64": "TYPE_INT64"}


@pytest.fixture(scope="module")
def pb2() -> Any:
    return pytest.importorskip(
        "tritonclient.grpc.model_config_pb2", reason="pip install 'tritonclient[http]' 'grpcio>=1.81.1'"
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """name -> (model folder in one repository, the PyTorch model it was exported from)."""
    from pvt.detection import retinanet
    from pvt.engine import load_recipe
    from pvt.segmentation import semantic_fpn
    from pvt.tasks import get_task

    base = tmp_path_factory.mktemp("triton")
    out = base / "repo"
    run = base / "run"
    run.mkdir()
    task = get_task("classification")
    sets = ["model.name=pvt_v2_b0", "model.num_classes=3", "data.input_size=64", "data.crop_pct=0.9",
            "data.interpolation=bilinear"]  # fmt: skip
    load_recipe("classification", task.data_config, {}, sets, model_cls=task.model_config).dump(run / "config.yaml")
    classifier = pvt.create_model("pvt_v2_b0", num_classes=3).eval()
    pvt.save_safetensors(classifier.state_dict(), run / "model.safetensors", arch="pvt_v2_b0")
    (run / "task.json").write_text(json.dumps({"classes": CLASSES}))
    cmd = ["export", str(run / "model.safetensors"), "--format", "triton", "--out", str(out), "--dynamic", "--no-check"]
    assert cli_main(cmd) == 0

    segmenter = semantic_fpn("resnet18", num_classes=3, fpn_channels=16, head_channels=16).eval()
    export_triton(segmenter, torch.rand(1, 3, 64, 64), out, dynamic=True)
    # Every detection scored (no threshold): random heads score below the default 0.05.
    detector = retinanet("pvt_v2_b0", num_classes=3, fpn_channels=16, min_size=64, max_size=64, score_thresh=0.0)
    detector.class_names = tuple(DETECTOR_CLASSES)
    perturb_(detector, std=0.05)  # else every score sits at the 0.01 prior and NMS breaks ties at random
    export_triton(detector.eval(), torch.rand(3, 64, 64), out, dynamic=True)
    return {
        "classifier": (out / "pvt_v2_b0", classifier),
        "segmenter": (out / "semantic_fpn_resnet18", segmenter),
        "detector": (out / "retinanet_pvt_v2_b0", detector),
    }


def _parse(pb2: Any, folder: Path) -> Any:
    from google.protobuf import text_format

    return text_format.Parse((folder / "config.pbtxt").read_text(encoding="utf-8"), pb2.ModelConfig())


def _graph_io(path: Path) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(name, ONNX element type name, dims with -1 for a named or unknown dim) per graph input / output."""
    proto = onnx.load(str(path))
    weights = {w.name for w in proto.graph.initializer}

    def rows(values: Any) -> list[tuple[str, str, list[int]]]:
        return [
            (
                v.name,
                onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
                [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim],
            )
            for v in values
            if v.name not in weights
        ]

    return rows(proto.graph.input), rows(proto.graph.output)


def _params(config: Any) -> dict[str, Any]:
    return {k: json.loads(v.string_value) for k, v in config.parameters.items()}


# -- the config against the ONNX file ----------------------------------------------------------


@pytest.mark.parametrize("which", ["classifier", "segmenter", "detector"])
def test_config_matches_the_onnx_graph(which: str, repo: dict[str, Any], pb2: Any) -> None:
    folder, _ = repo[which]
    config = _parse(pb2, folder)
    onnx_file = folder / "1" / "model.onnx"
    inputs, outputs = _graph_io(onnx_file)
    batched = which != "detector"  # a detector takes one image per run
    assert config.name == folder.name
    assert config.backend == "onnxruntime" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == (8 if batched else 0)
    assert config.HasField("dynamic_batching") == batched
    for got, want in [(config.input, inputs), (config.output, outputs)]:
        assert [t.name for t in got] == [n for n, _, _ in want]
        assert [pb2.DataType.Name(t.data_type) for t in got] == [TYPES[e] for _, e, _ in want]
        # Triton adds the batch dim itself: a batched model's dims leave it out.
        assert [list(t.dims) for t in got] == [d[1:] if batched else d for _, _, d in want]
    assert list(config.input[0].dims) == ([3, -1, -1])
    if batched:
        assert all(d[0] == -1 for _, _, d in inputs + outputs)
    assert [(g.count, pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [(1, "KIND_CPU")]

    # The parameters are the file's metadata, key for key, as the same JSON text.
    props = {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
    assert {k: v.string_value for k, v in config.parameters.items()} == props
    params = _params(config)
    assert params["pvt.task"] == {"classifier": "classification", "segmenter": "segmentation"}.get(which, "detection")
    assert params["pvt.preprocess"]


def test_parameters_carry_class_names_and_preprocessing(repo: dict[str, Any], pb2: Any) -> None:
    classifier = _params(_parse(pb2, repo["classifier"][0]))
    assert classifier["pvt.classes"] == CLASSES  # quotes, a backslash and an accent come back as written
    pre = classifier["pvt.preprocess"]
    assert (pre["resize_short_side"], pre["center_crop"], pre["interpolation"]) == (71, 64, "bilinear")
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
    assert classifier["pvt.input"]["layout"] == "NCHW" and classifier["pvt.size"] == [64, 64]

    detector = _params(_parse(pb2, repo["detector"][0]))
    assert detector["pvt.classes"] == DETECTOR_CLASSES and detector["pvt.label_offset"] == 0
    assert (
        detector["pvt.preprocess"]["inside_model"] is True and "short side 64" in detector["pvt.preprocess"]["resize"]
    )
    segmenter = _params(_parse(pb2, repo["segmenter"][0]))
    assert segmenter["pvt.preprocess"]["inside_model"]["mean"] == [0.485, 0.456, 0.406]


def _copy_model(src: Path, dst: Path, edit: Any = None) -> Path:
    """A model folder holding ``src``'s ONNX file, after ``edit(proto)`` if given."""
    (dst / "1").mkdir(parents=True)
    proto = onnx.load(str(src / "1" / "model.onnx"))
    if edit is not None:
        edit(proto)
    onnx.save(proto, str(dst / "1" / "model.onnx"))
    return dst


def test_device_name_and_batch_options(repo: dict[str, Any], pb2: Any, tmp_path: Path) -> None:
    folder = _copy_model(repo["classifier"][0], tmp_path / "pvt-b0.v2")
    write_config(folder, device="gpu", max_batch_size=32)
    config = _parse(pb2, folder)
    assert config.name == "pvt-b0.v2" and config.max_batch_size == 32
    assert pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_GPU"


def test_a_fixed_batch_is_not_batched_by_triton(repo: dict[str, Any], pb2: Any, tmp_path: Path) -> None:
    """A file whose metadata says its batch is fixed (pvt export without --dynamic) keeps its full
    dims and gets no batcher (Triton would otherwise add a second batch dim)."""

    def fixed(proto: Any) -> None:
        for p in proto.metadata_props:
            if p.key == "pvt.dynamic":
                p.value = json.dumps({"batch": 2, "height": False, "width": False})

    config = _parse(pb2, Path(write_config(_copy_model(repo["classifier"][0], tmp_path / "m", fixed))).parent)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [-1, 3, -1, -1]  # the graph's own (here still symbolic) dims


def test_wrong_inputs_are_refused_clearly(
    repo: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert cli_main(["export", "pvt_v2_b0", "--out", str(tmp_path / "m.onnx"), "--triton-name", "x"]) == 2
    assert "--triton-name apply to --format triton" in capsys.readouterr().err

    model = pvt.create_model("pvt_v2_b0", num_classes=3).eval()
    with pytest.raises(ExportError, match=r"Triton model name 'a/b': it names the model's folder"):
        export_triton(model, torch.rand(1, 3, 64, 64), tmp_path / "r", name="a/b")
    with pytest.raises(ExportError, match=r"Triton device 'tpu': expected one of cpu, gpu"):
        export_triton(model, torch.rand(1, 3, 64, 64), tmp_path / "r", device="tpu")
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match=r"file: is a file; --format triton writes a model repository folder"):
        export_triton(model, torch.rand(1, 3, 64, 64), tmp_path / "file")
    assert not (tmp_path / "r").exists()  # refused before exporting anything

    bare = _copy_model(repo["classifier"][0], tmp_path / "bare", lambda p: p.metadata_props.__delitem__(slice(None)))
    with pytest.raises(ExportError, match=r"model\.onnx: an ONNX model without pvt-vision metadata"):
        write_config(bare)

    def fixed_batch(proto: Any) -> None:  # says dynamic, but the graph's batch dim is 1
        proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1

    with pytest.raises(ExportError, match=r"batch is dynamic but image have no dynamic first dim"):
        write_config(_copy_model(repo["classifier"][0], tmp_path / "odd", fixed_batch))
    with pytest.raises(ExportError, match=r"ONNX element type COMPLEX64 .* has no Triton data type"):
        triton_type(onnx.TensorProto.COMPLEX64)
    with pytest.raises(ExportError, match=r"no such file; a Triton model folder holds 1/model\.onnx"):
        write_config(tmp_path / "empty")


# -- a real Triton server ------------------------------------------------------------------------

# The nvidia-pytriton wheel's tritonserver has the Python backend only, so a Python model stands in
# for the ONNX Runtime backend: it runs 1/model.onnx in ONNX Runtime under the config pvt wrote
# (backend swapped), so Triton itself checks the config, batches and shapes every request. Tensors
# cross by DLPack: the wheel's backend stub reads and writes NumPy 2 arrays wrongly through
# as_numpy() / Tensor(name, array) (empty or wrong data), not through DLPack.
STAND_IN = """
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feed = {n: np.from_dlpack(pb_utils.get_input_tensor_by_name(request, n)) for n in self.inputs}
            outs = self.session.run(self.outputs, feed)
            tensors = [pb_utils.Tensor.from_dlpack(n, o) for n, o in zip(self.outputs, outs)]
            responses.append(pb_utils.InferenceResponse(tensors))
        return responses
"""


def _tritonserver() -> tuple[Path, Path, Path]:
    """(the wheel's tritonserver folder, its bundled libraries, this Python's libpython folder), or skip."""
    spec = importlib.util.find_spec("pytriton")  # the wheel's files, without importing its package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("no tritonserver: pip install --no-deps 'nvidia-pytriton>=0.7' (Linux x86-64, glibc >= 2.35)")
    dist = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    libs = dist.parent.parent / "nvidia_pytriton.libs"
    stub = dist / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    if not (dist / "bin" / "tritonserver").is_file() or not stub.is_dir():
        pytest.skip(f"{dist}: no tritonserver binary or no Python backend stub for Python {stub.name}")
    # The stub embeds libpython; it must be this interpreter's, whose standard library it then
    # imports (the system's 3.11.2 with pyenv's 3.11.7 library fails in multiprocessing).
    libdir = Path(str(sysconfig.get_config_var("LIBDIR")))
    if not (libdir / str(sysconfig.get_config_var("INSTSONAME"))).is_file():
        pytest.skip(f"this Python has no shared libpython in {libdir} for the backend stub to embed")
    return dist, libs, libdir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(repo: dict[str, Any], tmp_path: Path) -> Iterator[Any]:
    """A tritonserver on the classifier and the detector, under their configs; yields an HTTP client."""
    http = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]'")
    dist, libs, libdir = _tritonserver()
    backends = tmp_path / "backends"
    shutil.copytree(dist / "backends", backends)
    shutil.copy(next((dist / "python_backend_stubs").glob(f"{sys.version_info.major}.{sys.version_info.minor}/*")),
                backends / "python" / "triton_python_backend_stub")  # fmt: skip
    served = tmp_path / "repo"
    for which in ("classifier", "detector"):
        folder = repo[which][0]
        dst = served / folder.name
        shutil.copytree(folder, dst)
        text = (dst / "config.pbtxt").read_text()
        swapped = text.replace('backend: "onnxruntime"\nplatform: "onnxruntime_onnx"\n', 'backend: "python"\n')
        assert swapped != text
        (dst / "config.pbtxt").write_text(swapped)
        (dst / "1" / "model.py").write_text(STAND_IN)
    port = _free_port()
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": os.pathsep.join([str(libdir), str(libs), os.environ.get("LD_LIBRARY_PATH", "")]),
        # The stand-in's numpy and onnxruntime: the stub's interpreter finds this environment as
        # pytriton's launcher lets it, by the python first on PATH.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    cmd = [str(dist / "bin" / "tritonserver"), f"--model-repository={served}", f"--backend-directory={backends}",
           f"--http-port={port}", "--allow-grpc=false", "--allow-metrics=false", "--exit-timeout-secs=1"]  # fmt: skip
    log = tmp_path / "tritonserver.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    client = http.InferenceServerClient(f"127.0.0.1:{port}", concurrency=2)
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if client.is_server_ready():
                    break
            except Exception:  # not listening yet
                pass
            time.sleep(0.2)
        assert proc.poll() is None and client.is_server_ready(), log.read_text()[-3000:]
        yield client
    finally:
        client.close()
        stop_process(proc)


def _preprocess(image: Image.Image, pre: dict[str, Any]) -> np.ndarray:
    """What the classifier's ``pvt.preprocess`` parameter says: resize the short side, centre crop,
    scale to 0..1, normalise; ``[3, H, W]`` float32."""
    w, h = image.size
    side, crop = pre["resize_short_side"], pre["center_crop"]
    size = (side, round(h * side / w)) if w <= h else (round(w * side / h), side)
    method = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[pre["interpolation"]]
    image = image.resize(size, method)
    left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
    x = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255
    x = (x - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def _infer(client: Any, name: str, x: np.ndarray, outputs: list[str]) -> Any:
    import tritonclient.http as http

    tensor = http.InferInput("image", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(name, [tensor], outputs=[http.InferRequestedOutput(o) for o in outputs])


def test_triton_server_answers_as_onnx_runtime_and_pytorch(server: Any, repo: dict[str, Any]) -> None:
    import onnxruntime as ort

    folder, model = repo["classifier"]
    config = server.get_model_config(folder.name)
    params = {k: json.loads(v["string_value"]) for k, v in config["parameters"].items()}
    assert params["pvt.classes"] == CLASSES
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in [(80, 60), (50, 90)]]
    x = np.stack([_preprocess(im, params["pvt.preprocess"]) for im in images])  # [2, 3, 64, 64]

    got = _infer(server, folder.name, x, ["logits"]).as_numpy("logits")
    direct = ort.InferenceSession(str(folder / "1" / "model.onnx")).run(["logits"], {"image": x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got, direct, atol=1e-5)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # Two one-image requests in flight at once: the dynamic batcher may join them; each gets its row.
    import tritonclient.http as http

    pending = []
    for i in range(2):
        tensor = http.InferInput("image", [1, *x.shape[1:]], "FP32")
        tensor.set_data_from_numpy(x[i : i + 1])
        pending.append(server.async_infer(folder.name, [tensor]))
    for i, request in enumerate(pending):
        np.testing.assert_allclose(request.get_result().as_numpy("logits")[0], direct[i], atol=1e-5)

    folder, detector = repo["detector"]
    image = rng.random((3, 64, 80), dtype=np.float32)  # one RGB image in 0..1, any size
    names = ["boxes", "scores", "labels"]
    result = _infer(server, folder.name, image, names)
    direct = ort.InferenceSession(str(folder / "1" / "model.onnx")).run(names, {"image": image})
    for name, want in zip(names, direct, strict=True):
        np.testing.assert_allclose(result.as_numpy(name), want, atol=1e-5)
    with torch.no_grad():
        ref = detector([torch.from_numpy(image)])[0]
    # The best detections (both sorted by score), where near-ties cannot reorder them.
    top = 10
    assert len(result.as_numpy("scores")) >= top and len(ref["scores"]) >= top
    np.testing.assert_allclose(result.as_numpy("scores")[:top], ref["scores"][:top].numpy(), atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("boxes")[:top], ref["boxes"][:top].numpy(), atol=1e-2)
    assert (result.as_numpy("labels")[:top] == ref["labels"][:top].numpy()).all()
