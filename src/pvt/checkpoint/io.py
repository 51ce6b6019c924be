"""Reading checkpoint files safely and writing this project's safetensors atomically."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pvt.checkpoint.layouts import CheckpointError, StateDict, strip_module_prefix, unwrap
from pvt.utils.files import atomic_write

FORMAT_NAME = "pvt-vision"
FORMAT_VERSION = "1"


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[StateDict, dict[str, str]]:
    """Load a ``.safetensors`` or torch file (``weights_only=True``) -> (state dict, metadata)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint file not found")
    if p.suffix == ".safetensors":
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p}: not a readable safetensors file ({e}); re-export it") from e
        return sd, meta
    return unwrap(read_checkpoint_object(p), str(p)), {}


# Packages whose pickled objects OpenMMLab checkpoints carry in their metadata, read as inert
# stand-ins; ``builtins.getattr`` is how pickle reaches a class attribute (numpy dtypes in
# mmengine's message hub), and its stand-in looks nothing up either.
INERT_PREFIXES = ("numpy.", "mmengine.", "mmcv.", "mmdet.", "mmseg.", "builtins.getattr")


def _inert_class(qualified: str) -> type:
    """A stand-in for a class a checkpoint pickles: it stores its arguments and runs nothing."""
    module, _, name = qualified.rpartition(".")

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def setstate(self: Any, state: Any) -> None:
        self.state = state

    attrs = {"__module__": module, "__qualname__": name, "__init__": init, "__setstate__": setstate}
    return type(name, (), attrs)


def read_checkpoint_object(path: str | os.PathLike[str], *, mmap: bool = False) -> Any:
    """The whole saved object of a torch file, read with ``weights_only=True`` (``mmap``: tensors
    mapped from the file, read only when touched, where the file is a zip archive).

    mmcv / mmengine files keep training metadata next to the weights (numpy scalars and arrays,
    config objects, message-hub buffers) that ``weights_only`` refuses. Globals of those packages
    (``INERT_PREFIXES``) are replaced by inert stand-ins (classes that store their arguments and
    execute nothing), so the tensors and plain metadata are read without ever importing or running
    the pickled code. Any other pickled object is refused, as before.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint file not found")
    mmap = mmap and zipfile.is_zipfile(p)
    try:
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(p)
            if not names or not all(n.startswith(INERT_PREFIXES) for n in names):
                raise
            with torch.serialization.safe_globals([_inert_class(n) for n in names]):
                return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a corrupt pickle can raise almost anything
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{p}: could not be read as a PyTorch checkpoint with weights_only=True ({first}). "
            "If the file is truncated, download it again; if it is trusted but pickles Python "
            "objects, re-save just its state dict: torch.save(model.state_dict(), path)"
        ) from e


def openmmlab_class_names(obj: Any) -> list[str] | None:
    """``meta.dataset_meta.classes`` (mmdet 3.x) or ``meta.CLASSES`` (mmdet 2.x), if plain strings."""
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return None
    dataset_meta = meta.get("dataset_meta")
    names = dataset_meta.get("classes") if isinstance(dataset_meta, Mapping) else None
    names = names if names is not None else meta.get("CLASSES")
    if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def save_safetensors(
    sd: StateDict,
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``sd`` (official names) as this project's safetensors, atomically.

    ``metadata``: extra string fields kept in the file's header (a whole model's backbone, class
    count, class names, ...); ``format`` and ``arch`` are always this function's.
    """
    meta = {**(metadata or {}), "format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    if arch:
        meta["arch"] = arch
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_keys(path: str | os.PathLike[str]) -> tuple[list[str], dict[str, str]]:
    """Tensor names and header metadata of a checkpoint file (safetensors: without reading tensors)."""
    if str(path).endswith(".safetensors"):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return list(f.keys()), dict(f.metadata() or {})
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); re-export it") from e
    # Mapped, not read: only the names are needed (whole-model conversion then reads the file once).
    sd, _ = strip_module_prefix(unwrap(read_checkpoint_object(path, mmap=True), str(path)))
    return list(sd), {}
