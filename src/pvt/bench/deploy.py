"""The ``deploy`` benchmark suite: exported files in ONNX Runtime beside PyTorch (``pvt bench
--suites deploy``, not in the default run; needs the ``deploy`` and ``peers`` extras).

Contenders per setting: our eager PyTorch path (fused kernels on), a peer's eager path (timm's
``pvt_v2_*``; timm has no PVT v1, so HF transformers' Pvt for PVT-Small; none for RetinaNet), ONNX
Runtime fp32 on our dynamic ONNX export, and ONNX Runtime int8 (``quantize_dynamic``: int8
weights of the MatMul / Gemm / Conv nodes, activations quantised per call). fp32 files are checked
against PyTorch (1e-4) before timing; the int8 rows note their largest output difference.
RetinaNet takes one image per run, so its batch 16 is 16 runs (PyTorch: one list of 16 images).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pvt.bench.harness import Row, Settings, alternate, infer, suite
from pvt.bench.peers import hf_twins, timm_twins
from pvt.deploy.exporter import export
from pvt.deploy.onnx_runtime import OnnxModel, load_onnx


def _quantise(src: Path, dst: Path) -> Path:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantiser logs a warning on the root logger for every tensor it leaves in float (the
    # detectors' index tensors): hundreds of lines that say nothing about the result.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return dst


def _runtime_pair(model: nn.Module, example: torch.Tensor, folder: Path, threads: int) -> dict[str, OnnxModel]:
    """ONNX Runtime fp32 and int8 sessions of ``model`` (dynamic export); the int8 copy carries
    the fp32 file's metadata (quantize_dynamic keeps the graph's metadata_props)."""
    fp32 = export(model, example, folder / "fp32.onnx", dynamic=True)
    out = {"onnxruntime fp32": load_onnx(fp32, threads=threads)}
    try:
        out["onnxruntime int8"] = load_onnx(_quantise(fp32, folder / "int8.onnx"), threads=threads)
    except Exception as e:  # a graph the quantiser rejects: say so in the results, time the rest
        print(f"bench deploy: int8 quantisation of {getattr(model, 'arch', '?')} failed: {e}")
    return out


def _max_diff(a: Any, b: Any) -> float:
    if isinstance(a, dict):
        return max(((a[k].float() - b[k].float()).abs().max().item() for k in ("scores",) if len(a[k])), default=0.0)
    return (a - b).abs().max().item()


def _time(
    s: Settings, setting: str, fns: dict[str, Callable[[], Any]], notes: dict[str, str], repeats: int | None = None
) -> None:
    # Batch 1 is the noisiest: twice the repeats, as the other suites do.
    repeats = repeats or (2 * s.repeats if setting.endswith("batch 1") else s.repeats)
    times = alternate(fns, repeats)
    for name, t in times.items():
        s.rows.append(Row("deploy", setting, name, 1e3 * t, repeats, note=notes.get(name, "")))


def _shares(totals: dict[str, float], top: int = 5) -> str:
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{name} {100 * t / whole:.0f}%" for name, t in ranked)


def ort_profile(model: OnnxModel, x: Any) -> str:
    """Where ONNX Runtime's time goes: the share of each op type in one profiled run."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = model.session.get_session_options().intra_op_num_threads
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
        feed = {model.input_name: (x[0] if isinstance(x, list) else x).numpy()}
        session.run(None, feed)  # warm
        session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + float(e["dur"])
    return "time by op: " + _shares(totals)


def torch_profile(model: nn.Module, x: Any) -> str:
    """The same for our eager path: self CPU time per aten op in one profiled run."""
    with torch.inference_mode():
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(x)
    totals = {e.key: float(e.self_cpu_time_total) for e in prof.key_averages()}
    return "time by op: " + _shares(totals)


def _classifiers(s: Settings, folder: Path) -> None:
    names = ["pvt_v2_b0"] if s.quick else ["pvt_v2_b2", "pvt_small"]
    size, batches = (64, [1, 2]) if s.quick else (224, [1, 16])
    for name in names:
        if name.startswith("pvt_v2"):
            ours, peer = timm_twins(name)
            peer_name = "timm"
        else:  # timm has no PVT v1
            ours, peer = hf_twins(name)
            peer_name = "HF transformers"
        runtimes = _runtime_pair(ours, torch.randn(1, 3, size, size), folder / name, s.threads)
        for batch in batches:
            x = torch.randn(batch, 3, size, size)
            with torch.inference_mode():
                ref = ours(x)
            notes = {}
            for label, rt in runtimes.items():
                diff = _max_diff(ref, rt(x))
                if "fp32" in label and diff > 1e-4:
                    raise RuntimeError(f"{rt.path}: ONNX Runtime differs from PyTorch by {diff:.2e}")
                notes[label] = f"max |logit diff| {diff:.1e}"
            if batch == batches[0]:  # where the time goes, op type by op type
                notes["pvt-vision"] = torch_profile(ours, x)
                fp32 = runtimes["onnxruntime fp32"]
                notes["onnxruntime fp32"] += "; " + ort_profile(fp32, x)
            fns: dict[str, Callable[[], Any]] = {"pvt-vision": infer(ours, x), peer_name: infer(peer, x)}
            fns.update({label: infer(rt, x) for label, rt in runtimes.items()})
            _time(s, f"{name} {size}px batch {batch}", fns, notes)


def _retinanet(s: Settings, folder: Path) -> None:
    from pvt.detection import retinanet

    backbone, side = ("pvt_tiny", 128) if s.quick else ("pvt_small", 800)
    h, w = (128, 160) if s.quick else (800, 1216)
    # Every anchor scored (no threshold): random weights score nothing above 0.05, and a trained
    # detector keeps thousands of candidates for top-k and NMS anyway.
    model = retinanet(backbone, min_size=side, max_size=1333, score_thresh=0.0).eval()
    runtimes = _runtime_pair(model, torch.rand(3, side, side), folder / "retinanet", s.threads)
    for batch in [1, 2] if s.quick else [1, 16]:
        images = [torch.rand(3, h, w) for _ in range(batch)]
        with torch.inference_mode():
            ref = model(images[:1])[0]
        notes = {}
        for label, rt in runtimes.items():
            got = rt(images[:1])[0]
            if "fp32" in label and (len(got["boxes"]) != len(ref["boxes"]) or _max_diff(ref, got) > 1e-4):
                raise RuntimeError(f"{rt.path}: ONNX Runtime's detections differ from PyTorch's")
            notes[label] = f"{len(got['boxes'])} detections (PyTorch {len(ref['boxes'])})"
        if batch == 1:
            notes["pvt-vision"] = torch_profile(model, images)
            notes["onnxruntime fp32"] += "; " + ort_profile(runtimes["onnxruntime fp32"], images)
        fns: dict[str, Callable[[], Any]] = {"pvt-vision": infer(model, images)}
        fns.update({label: infer(rt, images) for label, rt in runtimes.items()})
        # Seconds per call at 800x1216: fewer rounds, as the dense suite's detector comparison.
        _time(s, f"RetinaNet {backbone} {h}x{w} batch {batch}", fns, notes, max(3, s.repeats // 2))


@suite("deploy", default=False, needs=("deploy", "peers"), doc="exported files in ONNX Runtime vs PyTorch eager")
def suite_deploy(s: Settings) -> None:
    """v2-b2 and PVT-Small at 224 (batch 1 and 16) and RetinaNet PVT-Small on 800x1216 images:
    PyTorch eager (ours, a peer's) against ONNX Runtime fp32 and int8."""
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        _classifiers(s, Path(tmp))
        _retinanet(s, Path(tmp))
