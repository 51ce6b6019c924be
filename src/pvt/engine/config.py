"""Recipes as data: typed dataclasses, YAML presets, ``--set key=value`` overrides.

A recipe has five sections. ``model``, ``optim``, ``schedule`` and ``train`` belong to the engine;
``data`` is the task's own dataclass (the engine never looks inside it).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad preset or override; the message names the key and what is accepted."""


@dataclass
class ModelConfig:
    name: str = "pvt_small"
    num_classes: int = 1000
    drop_path_rate: float = 0.1
    checkpoint: str | None = None  # any layout pvt.load_checkpoint accepts (fine-tuning)
    pretrained: bool | str = False  # published ImageNet weights: true (default source) or a tag (pvt weights)
    freeze_stages: int = 0  # freeze the first k backbone stages
    img_size: int | None = None  # v1 position-table grid (None: 224)
    allow_nonfinite: bool = False  # load weights holding NaN / Inf (refused by default; --allow-nonfinite)


@dataclass
class OptimConfig:
    lr: float = 5e-4  # at base_batch; scaled by total batch / base_batch when scale_lr
    base_batch: int = 512
    scale_lr: bool = True
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = None  # max global grad norm
    accum_steps: int = 1  # gradient accumulation
    backbone_lr_mult: float = 1.0  # lr multiplier of everything but the head
    layer_decay: float | None = None  # layer-wise lr decay per stage (fine-tuning)


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | poly | step | constant
    epochs: int = 300
    iterations: int | None = None  # overrides epochs when set (segmentation-style recipes)
    warmup_epochs: float = 5.0
    warmup_iters: int | None = None  # overrides warmup_epochs when set
    warmup_lr: float = 1e-6  # absolute start of the linear warmup
    min_lr: float = 1e-5
    power: float = 0.9  # poly
    milestones: list[float] = field(default_factory=list)  # step: epochs (or iterations)
    gamma: float = 0.1  # step


@dataclass
class TrainConfig:
    seed: int = 0
    deterministic: bool = False  # bit-for-bit repeatable CPU runs
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "none"  # none | bf16 | fp16 (GPU only, with a grad scaler) | auto (bf16 where the hardware has it)
    compile: bool = False
    ema_decay: float | None = None
    checkpoint_every: int = 500  # iterations; also one at the end of every epoch
    keep_checkpoints: int = 2
    eval_every: int = 1  # epochs
    log_every: int = 10  # iterations
    tensorboard: bool = False
    grad_checkpointing: bool = False
    dist_timeout: float = 1800.0  # seconds a collective waits for every rank; then the job ends with a message
    progress: bool = True  # rank 0: tqdm bars on a terminal, a plain line every log_every otherwise


ENGINE_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
}


@dataclass
class Recipe:
    """A whole run: the engine's sections and the task's ``data`` section."""

    task: str
    model: ModelConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    train: TrainConfig
    data: Any

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            **{name: _plain(dataclasses.asdict(getattr(self, name))) for name in (*ENGINE_SECTIONS, "data")},
        }

    def dump(self, path: str | Path) -> None:
        from pvt.utils.files import atomic_write

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        items = [_coerce(v, args[0] if args else Any, key) for v in value]
        if origin is tuple and args and args[-1] is not Ellipsis and len(items) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "2e-4" (no dot) as a string; accept what float() accepts.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return build_section(tp, value, key)  # type: ignore[arg-type]
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def build_section(cls: type[T], values: dict[str, Any], prefix: str) -> T:
    """Instantiate dataclass ``cls`` from a dict, checking every key and type."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{prefix}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """``["optim.lr=2e-4", "train.amp=bf16"]`` -> ``[(["optim", "lr"], 0.0002), ...]``."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=2e-4")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        out.append((key.strip().split("."), value))
    return out


def merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def load_recipe(
    task: str,
    data_cls: type,
    preset: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    model_cls: type[ModelConfig] = ModelConfig,
) -> Recipe:
    """Defaults <- preset dict <- ``--set`` overrides, validated into a ``Recipe``."""
    raw: dict[str, Any] = {k: dict(v) for k, v in (preset or {}).items() if isinstance(v, dict)}
    for path, value in parse_overrides(overrides or []):
        if path[0] not in (*ENGINE_SECTIONS, "data") or len(path) < 2:
            raise ConfigError(
                f"--set {'.'.join(path)}: keys start with one of {[*ENGINE_SECTIONS, 'data']}, e.g. optim.lr=2e-4"
            )
        merge(raw, path, value)
    unknown = sorted(set(raw) - {*ENGINE_SECTIONS, "data", "task"})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; valid: {[*ENGINE_SECTIONS, 'data']}")
    classes = {**ENGINE_SECTIONS, "model": model_cls}  # a task may extend the model section
    sections: dict[str, Any] = {name: build_section(cls, raw.get(name, {}), name) for name, cls in classes.items()}
    data: Any = build_section(data_cls, raw.get("data", {}), "data")
    recipe = Recipe(task=task, data=data, **sections)
    validate(recipe)
    return recipe


def validate(r: Recipe) -> None:
    """Value checks the types cannot express."""
    checks = [
        (r.optim.lr > 0, "optim.lr must be > 0"),
        (r.optim.accum_steps >= 1, "optim.accum_steps must be >= 1"),
        (
            r.schedule.name in ("cosine", "poly", "step", "constant"),
            "schedule.name: cosine|poly|step|constant",
        ),
        (r.schedule.epochs >= 1 or (r.schedule.iterations or 0) >= 1, "schedule.epochs must be >= 1"),
        (r.train.amp in ("none", "bf16", "fp16", "auto"), "train.amp must be none, bf16, fp16 or auto"),
        (r.train.device in ("auto", "cpu", "cuda"), "train.device must be auto, cpu or cuda"),
        (r.train.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (0 <= r.model.freeze_stages <= 4, "model.freeze_stages must be in 0..4"),
        (r.train.ema_decay is None or 0 < r.train.ema_decay < 1, "train.ema_decay must be in (0, 1)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: cannot read YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections, got {type(data).__name__}")
    return data
