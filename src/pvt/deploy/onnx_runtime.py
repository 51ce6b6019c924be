"""Exported ONNX files in ONNX Runtime, behind the same call as the PyTorch models, so that the
tasks' own predict and evaluate code runs them unchanged (``pvt predict / eval --runtime
onnxruntime --model FILE.onnx``).

``load_onnx(path)`` returns an ``nn.Module`` without parameters: a classifier, backbone or
Semantic FPN file takes ``[B, 3, H, W]`` and returns what the PyTorch model returns; a detector
file takes a list of ``[3, H, W]`` images and returns torchvision's list of dicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pvt.deploy.exporter import read_metadata
from pvt.deploy.spec import ExportError


def session(path: str | Path, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU; errors name the file and the fix."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError("ONNX Runtime is not installed: pip install 'pvt-vision[deploy]'") from e
    options = ort.SessionOptions()
    # Errors only: the TorchScript exporter's declared shapes of Mask R-CNN's mask-pasting loop
    # make ONNX Runtime warn on every run that the real shape differs (it is then used as is).
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Idle workers otherwise spin after each run, taking the cores from whatever runs next
        # (in the deploy suite: the PyTorch contender, timed in alternation).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(
            f"{path}: ONNX Runtime cannot load this file ({type(e).__name__}: {str(e)[:300]}); it is corrupt, cut "
            "off or not ONNX: re-export it with pvt export"
        ) from e


class OnnxModel(nn.Module):
    """Base: the session, the file's metadata, the fixed input dims (None where dynamic)."""

    def __init__(self, path: str | Path, meta: dict[str, Any], threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.metadata = meta
        self.session = session(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        shape = self.session.get_inputs()[0].shape
        self.fixed = [d if isinstance(d, int) else None for d in shape]
        self.class_names = meta.get("class_names")
        self.arch = meta.get("arch")
        # The tasks read a model's device from its parameters: this empty one says CPU (run()
        # hands ONNX Runtime CPU arrays whatever the device).
        self.device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def _check(self, x: Tensor) -> None:
        for axis, (want, got) in enumerate(zip(self.fixed, x.shape, strict=False)):
            if want is not None and want != got:
                raise ExportError(
                    f"{self.path}: exported with a fixed input shape {self.fixed} (None: dynamic), got "
                    f"{list(x.shape)} (dimension {axis}); re-export with pvt export --dynamic, or with --size / "
                    "--batch matching the input"
                )

    def run(self, x: Tensor) -> list[np.ndarray]:
        self._check(x)
        feed = {self.input_name: x.detach().to("cpu", torch.float32).contiguous().numpy()}
        return list(self.session.run(None, feed))


class OnnxDense(OnnxModel):
    """Classifier (logits), features-only backbone (list of maps) or Semantic FPN (logits)."""

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.fixed[0] == 1 and x.shape[0] > 1:  # a file exported for batch 1: one run per image
            parts = [self.run(x[i : i + 1]) for i in range(x.shape[0])]
            outs = [torch.from_numpy(np.concatenate(p)) for p in zip(*parts, strict=True)]
        else:
            outs = [torch.from_numpy(o) for o in self.run(x)]
        return outs if len(outs) > 1 else outs[0]  # a backbone's maps as a list, else one tensor


class OnnxDetector(OnnxModel):
    """A one-image file (RetinaNet / Mask R-CNN): one session run per image, torchvision's list of dicts."""

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        names = [o.name for o in self.session.get_outputs()]
        results = []
        for image in images:
            outs = self.run(image)
            results.append({n: torch.from_numpy(o) for n, o in zip(names, outs, strict=True)})
        return results


def load_onnx(path: str | Path, task: str | None = None, threads: int | None = None) -> OnnxModel:
    """The exported ``path`` as a module; ``task`` (classification / detection / segmentation), when
    given, must be the file's (``features`` files serve no task)."""
    if Path(path).suffix != ".onnx":
        raise ExportError(f"{path}: --runtime onnxruntime takes a .onnx file written by pvt export")
    meta = read_metadata(path)
    if task is not None and meta["task"] != task:
        raise ExportError(f"{path}: holds a {meta['task']} model ({meta.get('arch')}), not a {task} one")
    one_image = str(meta.get("input", {}).get("layout", "")).startswith("CHW")  # no batch axis: one image a run
    cls = OnnxDetector if one_image else OnnxDense
    return cls(path, meta, threads)


__all__ = ["OnnxDense", "OnnxDetector", "OnnxModel", "load_onnx", "session"]
