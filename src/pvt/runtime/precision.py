"""Inference at the hardware's fastest arithmetic: fp32, bf16 or int8, for every task's model.

``optimize_for_inference(model, precision)`` prepares a classifier, a features-only backbone, a
torchvision detector or a Semantic FPN for inference:

- ``bf16``: the PVT and the parts around it that do the arithmetic (FPN, detection / segmentation
  heads) get bf16 weights, cast once; their inputs are cast to bf16 and their outputs back to fp32,
  so anchors, box decoding, NMS and resizing stay fp32 (a bf16 box coordinate near 800 px would be
  off by up to 2 px). On CPU the fused oneDNN path runs bf16 too (prepacked bf16 weights). Only
  where the hardware has bf16 units: on a CPU without ``avx512_bf16`` / ``amx_bf16`` bf16 runs
  emulated, ~14x slower than fp32 (measured on an AMD EPYC), so asking for it warns and keeps fp32.
- ``int8``: the PVT (the model's ``PyramidBackbone``) is quantised statically through PyTorch's
  PT2E flow with torchao's ``X86InductorQuantizer`` (int8 weights per channel, int8 activations
  with scales calibrated on the task's own images) and compiled by inductor with freezing, which
  fuses the quantise / dequantise ops into oneDNN int8 kernels. Exported with dynamic batch,
  height and width, so one calibration serves every input size; inductor compiles once per new
  shape (then shape-generic code) and caches it. Measured on an AMD EPYC with AVX512-VNNI
  (2 threads, pvt_v2_b2, batch 16): 2.2x our fused fp32 path. torchao's dynamic-activation int8
  config measured only 1.3x there: computing activation scales per call costs what int8 gains.
- ``auto``: bf16 where the hardware has it (GPUs; CPUs with AMX or AVX512-BF16: on an AMD EPYC
  with AVX512-BF16 alone, pvt_v2_b2 ran 1.56x / 1.89x faster than fp32 at batch 1 / 16), fp32
  elsewhere, so never an emulated precision. int8 changes the numbers more and needs calibration
  data, so it is asked for by name.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pvt.layers import fused
from pvt.models.base import PyramidBackbone
from pvt.utils.hardware import CPU_FLAGS, EMULATED_BF16_SLOWDOWN, CpuInfo, cpu_info

PRECISIONS = ("fp32", "bf16", "int8", "auto")


def resolve_precision(precision: str, device: torch.device | str = "cpu", *, cpu: CpuInfo | None = None) -> str:
    """The precision that will run: ``precision`` itself, ``auto``'s choice, or fp32 with a
    warning where the hardware cannot run what was asked for."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    dev = torch.device(device)
    cpu = cpu or cpu_info()
    if dev.type == "cuda":
        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if precision == "int8":
            raise ValueError("precision int8 is for CPUs (PT2E x86 quantisation); on a GPU use bf16")
        if precision == "auto":
            return "bf16" if bf16_ok else "fp32"
        if precision == "bf16" and not bf16_ok:
            warnings.warn("this GPU has no bf16 arithmetic; running fp32", stacklevel=2)
            return "fp32"
        return precision
    if precision == "auto":
        return "bf16" if cpu.bf16 and _mkldnn_bf16() else "fp32"
    if precision == "bf16" and not (cpu.bf16 and _mkldnn_bf16()):
        warnings.warn(
            f"precision bf16 asked for, but this CPU ({cpu.model}) has neither avx512_bf16 nor amx_bf16: "
            f"bf16 would run emulated, {EMULATED_BF16_SLOWDOWN}; running fp32",
            stacklevel=2,
        )
        return "fp32"
    if precision == "int8" and not cpu.int8_dot:
        warnings.warn(
            f"precision int8 on a CPU ({cpu.model}) without avx512_vnni / avx_vnni / amx_int8: int8 "
            "dot products run without hardware support and may be no faster than fp32",
            stacklevel=2,
        )
    return precision


def _mkldnn_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def optimize_for_inference(
    model: nn.Module,
    precision: str = "auto",
    *,
    compile: bool = False,
    calibration: Iterable[Any] | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """``model`` ready for inference at ``precision`` (fp32 / bf16 / int8 / auto), in eval mode.

    The model is changed in place where it can be (bf16 parts) and returned; call its result as
    before. ``compile`` runs the arithmetic parts through ``torch.compile`` (inductor, weights
    frozen); int8 is always compiled. int8 needs ``calibration``: a few inputs exactly as the
    model takes them (image batches for a classifier, lists of images for a detector), from the
    task's own data. The precision that ran is in ``result.pvt_precision``.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    chosen = resolve_precision(precision, device)
    model.eval()
    # Weights made under inference mode would be inference tensors, which the fused path's
    # packed-weight cache (keyed on version counters), oneDNN's bf16 kernels and the exporter
    # cannot use: a model built or copied under inference mode gets plain copies first.
    with torch.inference_mode(False):
        _plain_tensors(model)
        if chosen == "bf16":
            model = _to_bf16(model, compile)
        elif chosen == "int8":
            if calibration is None:
                raise ValueError("precision int8 needs calibration inputs (a few batches of the task's own images)")
            model = _to_int8(model, list(calibration))
        elif compile:
            model = _compile_parts(model)
    model.pvt_precision = chosen  # type: ignore[assignment]
    return model


def _plain_tensors(model: nn.Module) -> None:
    """Replace every inference-mode parameter and buffer of ``model`` by a plain copy (in place)."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_inference():
                setattr(module, name, nn.Parameter(param.clone(), requires_grad=param.requires_grad))
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_inference():
                module.register_buffer(name, buf.clone(), persistent=name not in module._non_persistent_buffers_set)


def calibration_inputs(
    dataset: Any, collate: Callable[[list[Any]], Any], *, batches: int = 4, batch_size: int = 8
) -> list[Any]:
    """Model inputs for int8 calibration: the first element of each of the first ``batches``
    batches of ``dataset`` (a task's training split, its augmentation included), batched by the
    task's ``collate``. Spread over the dataset so that every class tends to be seen."""
    n = len(dataset)
    if n == 0:
        raise ValueError("precision int8: the calibration data set is empty")
    count = min(n, batches * batch_size)
    picks = [round(i * (n - 1) / max(count - 1, 1)) for i in range(count)]
    state = random.getstate()
    with torch.random.fork_rng():  # the training augmentation draws the same way on every run
        torch.manual_seed(0)
        random.seed(0)
        items = [dataset[i] for i in picks]
    random.setstate(state)
    return [collate(items[i : i + batch_size])[0] for i in range(0, count, batch_size)]


def _cast(obj: Any, src: torch.dtype, dst: torch.dtype) -> Any:
    """``obj`` with every ``src`` tensor in it (through tuples, lists and dicts) cast to ``dst``."""
    if isinstance(obj, Tensor):
        return obj.to(dst) if obj.dtype == src else obj
    if isinstance(obj, Mapping):
        return type(obj)((k, _cast(v, src, dst)) for k, v in obj.items())  # type: ignore[call-arg]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(_cast(v, src, dst) for v in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(_cast(v, src, dst) for v in obj)
    return obj


class _Wrapped(nn.Module):
    """Stands in for a model part: attributes it lacks are looked up on the original part
    (``out_channels``, ``feature_info`` ...), which it keeps without registering (its weights are
    not this module's)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_original", original)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


class Bf16Part(_Wrapped):
    """A part with bf16 weights: fp32 tensors in are cast to bf16, bf16 tensors out to fp32."""

    def __init__(self, part: nn.Module, compile: bool = False) -> None:
        super().__init__(part)
        self.part = part.to(torch.bfloat16)
        # Not registered: the compiled wrapper holds the same weights as ``part``.
        object.__setattr__(self, "_run", _compiled(self.part) if compile else self.part)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self._run(*_cast(args, torch.float32, torch.bfloat16), **_cast(kwargs, torch.float32, torch.bfloat16))
        return _cast(out, torch.bfloat16, torch.float32)


class CompiledPart(_Wrapped):
    """A part run through ``torch.compile`` (fp32), or an int8 program compiled the same way."""

    def __init__(self, original: nn.Module, program: nn.Module | None = None) -> None:
        super().__init__(original)
        self.program = program if program is not None else original
        object.__setattr__(self, "_run", _compiled(self.program))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(*args, **kwargs)


def _compiled(module: nn.Module) -> Callable[..., Any]:
    """``module`` compiled by inductor with frozen weights, once per input shape (then cached).

    Freezing constant-folds the weights into the graph and prepacks them for oneDNN (and lets
    inductor match its int8 patterns); set per call, not process-wide (compilation happens on a
    call). Shapes are static: with the weights frozen, oneDNN's prepacking needs them.
    """
    program = torch.compile(module, dynamic=False)

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch._inductor.config.patch(freezing=True), warnings.catch_warnings():
            # inductor's own oneDNN lowering copy-constructs tensors (torch's advice to itself)
            warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
            return program(*args, **kwargs)

    return run


def _parts(model: nn.Module, names: Sequence[str]) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, part) for each dotted name present in ``model``."""
    found = []
    for dotted in names:
        *path, attr = dotted.split(".")
        parent: Any = model
        for p in path:
            parent = getattr(parent, p, None)
        part = getattr(parent, attr, None) if isinstance(parent, nn.Module) else None
        if isinstance(part, nn.Module) and not isinstance(part, _Wrapped):
            found.append((parent, attr, part))
    return found


def _to_bf16(model: nn.Module, compile: bool) -> nn.Module:
    return _wrap_parts(model, lambda part: Bf16Part(part, compile), whole_if_none=False)


def _compile_parts(model: nn.Module) -> nn.Module:
    return _wrap_parts(model, CompiledPart, whole_if_none=True)


def _wrap_parts(model: nn.Module, wrap: Callable[[nn.Module], nn.Module], *, whole_if_none: bool) -> nn.Module:
    """A PVT wrapped whole; a task model with each of the parts it names in ``model.bf16_parts``
    (module paths; set by the task's builder) wrapped in place (none found: the whole model
    wrapped, or an error when ``whole_if_none`` is False)."""
    if isinstance(model, PyramidBackbone):
        return wrap(model)
    parts = _parts(model, getattr(model, "bf16_parts", ()))
    if not parts:
        if whole_if_none:
            return wrap(model)
        raise ValueError(f"{type(model).__name__}: no part to run in bf16 (expected a PVT or a task model of pvt)")
    for parent, attr, part in parts:
        setattr(parent, attr, wrap(part))
    return model


def _find_pvt(model: nn.Module) -> tuple[nn.Module | None, str, PyramidBackbone]:
    """(parent, attribute, the PVT) of the model's first ``PyramidBackbone`` (parent None: the model)."""
    if isinstance(model, PyramidBackbone):
        return None, "", model
    for name, module in model.named_modules():
        if isinstance(module, PyramidBackbone):
            *path, attr = name.split(".")
            return model.get_submodule(".".join(path)), attr, module
    raise ValueError(f"{type(model).__name__}: int8 quantises the PVT inside a model, and this one has none")


def _to_int8(model: nn.Module, calibration: list[Any]) -> nn.Module:
    if not calibration:
        raise ValueError("precision int8: the calibration set is empty")
    parent, attr, pvt = _find_pvt(model)
    inputs = _pvt_inputs(model, pvt, calibration)
    program = quantize_pt2e_int8(pvt, inputs)
    if parent is None:
        return program
    setattr(parent, attr, program)
    return model


def _pvt_inputs(model: nn.Module, pvt: nn.Module, calibration: list[Any]) -> list[Tensor]:
    """The PVT's own inputs while ``model`` runs on ``calibration`` (a detector's PVT sees resized,
    normalised, padded batches)."""
    if model is pvt:
        return [torch.as_tensor(x) for x in calibration]
    seen: list[Tensor] = []
    hook = pvt.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for x in calibration:
                model(x)
    finally:
        hook.remove()
    return seen


def quantize_pt2e_int8(pvt: nn.Module, inputs: list[Tensor]) -> CompiledPart:
    """``pvt`` quantised to int8 (PT2E, ``X86InductorQuantizer``'s static per-channel config),
    calibrated on ``inputs`` ([B, 3, H, W] batches) and compiled; batch, height and width dynamic."""
    from torch.export import Dim

    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as e:
        raise ValueError(f"precision int8 needs torchao ({e}): pip install 'pvt-vision[precision]'") from e

    example = inputs[0]
    if example.shape[0] == 1:  # a batch of 1 would be exported as a constant batch size
        example = example.expand(2, -1, -1, -1).contiguous()
    dynamic = ({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},)
    previous = fused.set_enabled(False)  # export the plain ops the quantiser knows
    try:
        with torch.no_grad():
            graph = torch.export.export(pvt.eval(), (example,), dynamic_shapes=dynamic).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(graph, quantizer)  # type: ignore[arg-type]
        with torch.no_grad():
            for x in inputs:
                prepared(x)
        program = convert_pt2e(prepared)
    finally:
        fused.set_enabled(previous)
    return CompiledPart(pvt, program)


__all__ = [
    "CPU_FLAGS",
    "PRECISIONS",
    "Bf16Part",
    "CompiledPart",
    "CpuInfo",
    "calibration_inputs",
    "cpu_info",
    "optimize_for_inference",
    "quantize_pt2e_int8",
    "resolve_precision",
]
