"""Checkpoint reading, layout conversion and strict loading (see ``loader.load_checkpoint``)."""

from pvt.checkpoint.io import read_checkpoint, save_safetensors
from pvt.checkpoint.layouts import LAYOUTS, CheckpointError, detect_layout, to_official
from pvt.checkpoint.loader import LoadReport, infer_arch, load_checkpoint, read_state_dict

__all__ = [
    "LAYOUTS",
    "CheckpointError",
    "LoadReport",
    "detect_layout",
    "infer_arch",
    "load_checkpoint",
    "read_checkpoint",
    "read_state_dict",
    "save_safetensors",
    "to_official",
]
