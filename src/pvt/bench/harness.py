"""The benchmark harness: settings, rows, timing in alternation, GEMM peaks, the machine record and
the suite registry.

Every comparison builds the contenders from the same weights (our converter loads the peer's state
dict) and checks their outputs agree before timing; contenders are timed in alternation, round
after round, and the median is reported, so a machine's drift hits all of them alike.

A suite is one module of this package that registers itself on import (:func:`suite`); the
registry imports the modules named in :data:`SUITE_MODULES` by name (``importlib``), so this module
never imports a suite. Adding a suite: one new module here and its name in that list. Each suite
says whether it is in the default run, how the report shows its rows (a function rows -> markdown
lines; by default the speed table of :mod:`pvt.bench.report`), its plots if any, and the extras its
contenders need. :mod:`pvt.bench.runner` runs the chosen suites and writes the results.
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pvt.bench.peers import check_twins
from pvt.models.complexity import complexity
from pvt.runtime import malloc as runtime
from pvt.runtime.precision import CPU_FLAGS, cpu_info

# The suite modules of this package, in the report's order; each registers its suites on import.
SUITE_MODULES = ("classify", "train", "dense", "scaling", "precision", "memory", "serve", "deploy", "predict")
PRECISIONS = ("fp32", "bf16", "int8")

_OWN = ("suite", "setting", "contender", "ms", "repeats", "extra")


@dataclass(init=False)
class Row:
    """One contender in one setting: median milliseconds over ``repeats`` alternating rounds.

    The common fields, plus the suite's own in ``extra`` (given as keywords, read as attributes:
    ``Row("scaling", "224px", "pvt_v2_b2", 9.0, 3, gmacs=4.0, peak_mib=20.0).peak_mib``). Fields
    most suites use: ``gmacs`` (per call, papers' convention; None where not counted), ``note``,
    ``precision`` (the arithmetic; its GEMM peak is the row's % of peak)."""

    suite: str
    setting: str
    contender: str
    ms: float
    repeats: int
    extra: dict[str, Any]

    def __init__(
        self,
        suite: str,
        setting: str,
        contender: str,
        ms: float,
        repeats: int,
        *,
        extra: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        self.suite, self.setting, self.contender, self.ms, self.repeats = suite, setting, contender, ms, repeats
        self.extra = {**(extra or {}), **fields}
        if clash := sorted(k for k in self.extra if k in _OWN or hasattr(type(self), k)):
            raise TypeError(f"Row: per-suite field(s) {', '.join(clash)} would hide the row's own")

    def __getattr__(self, name: str) -> Any:  # only called where the ordinary lookup fails
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} of suite {self.__dict__.get('suite')!r} has no field {name!r}")

    def get(self, name: str, default: Any = None) -> Any:
        """The per-suite field ``name``, else ``default``."""
        return self.extra.get(name, default)

    def to_dict(self) -> dict[str, Any]:
        """The row as ``results.json`` holds it (flat: ``Row(**row.to_dict())`` gives it back)."""
        return {"suite": self.suite, "setting": self.setting, "contender": self.contender, "ms": self.ms,
                "repeats": self.repeats, **self.extra}  # fmt: skip

    @property
    def gflops(self) -> float | None:
        """Achieved GFLOP/s (2 FLOPs per MAC), where the row counts its GMACs."""
        gm = self.extra.get("gmacs")
        return None if gm is None else 2 * gm / (self.ms / 1e3)


SuiteTable = Callable[[list[Row], dict[str, float]], list[str]]  # (the suite's rows, GEMM peaks) -> markdown
SuitePlots = Callable[[list[Row], Path], list[Path]]  # (the suite's rows, folder) -> PNGs written


@dataclass(frozen=True)
class Suite:
    """A registered suite: ``run`` appends its rows to ``Settings.rows``."""

    name: str
    run: Callable[[Settings], None]
    default: bool = True  # in the default run (else by name only: ``--suites NAME``)
    table: SuiteTable | None = None  # its section of RESULTS.md (None: the report's speed table)
    plots: SuitePlots | None = None  # PNGs of its own
    speedups: bool = False  # its rows go into speedups.png (contender's time over pvt-vision's)
    needs: tuple[str, ...] = ()  # the extras its contenders need (pvt-vision[...])
    doc: str = ""  # a few words for ``pvt bench --help`` (suites outside the default run)

    @property
    def module(self) -> str:
        return self.run.__module__


_REGISTRY: dict[str, Suite] = {}


def register_suite(entry: Suite) -> Suite:
    """Add a suite to the registry (again from the same module: replaced, as on a reload)."""
    known = _REGISTRY.get(entry.name)
    if known is not None and known.module != entry.module:
        raise ValueError(f"bench suite {entry.name!r} is registered by {known.module} and {entry.module}")
    _REGISTRY[entry.name] = entry
    return entry


def suite(
    name: str,
    *,
    default: bool = True,
    table: SuiteTable | None = None,
    plots: SuitePlots | None = None,
    speedups: bool = False,
    needs: str | Iterable[str] = (),
    doc: str = "",
) -> Callable[[Callable[[Settings], None]], Callable[[Settings], None]]:
    """Decorator: register the function as the suite ``name`` (see :class:`Suite`)."""
    extras = (needs,) if isinstance(needs, str) else tuple(needs)

    def register(fn: Callable[[Settings], None]) -> Callable[[Settings], None]:
        register_suite(Suite(name, fn, default, table, plots, speedups, extras, doc))
        return fn

    return register


def suites() -> dict[str, Suite]:
    """Every registered suite by name, in :data:`SUITE_MODULES` order (the modules imported now)."""
    for module in SUITE_MODULES:
        importlib.import_module(f"pvt.bench.{module}")
    order = {f"pvt.bench.{m}": i for i, m in enumerate(SUITE_MODULES)}
    ranked = sorted(_REGISTRY.values(), key=lambda s: order.get(s.module, len(order)))  # stable: module order
    return {s.name: s for s in ranked}


def default_suites() -> tuple[str, ...]:
    """The suites ``pvt bench`` runs when none are named."""
    return tuple(name for name, s in suites().items() if s.default)


@dataclass
class Settings:
    threads: int = 2
    repeats: int = 7
    quick: bool = False  # tiny models and inputs: checks the machinery, not the speed
    suites: tuple[str, ...] = field(default_factory=default_suites)
    compile: bool = True
    update: bool = False  # keep the other suites' rows of an earlier results.json in the folder
    precisions: tuple[str, ...] = PRECISIONS  # what the precision suite measures (where native)
    presets: tuple[str, ...] = ()  # the accuracy suite's presets (empty: all; --quick: digits)
    rows: list[Row] = field(default_factory=list)


def alternate(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin (the order rotates per round)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - start)
    return {n: sorted(t)[len(t) // 2] for n, t in times.items()}


def gemm_peaks(n: int = 2048, repeats: int = 5, *, int8: bool = True) -> dict[str, float]:
    """GFLOP/s (GOP/s for int8) of an n x n GEMM in each precision this CPU runs natively: the
    ceiling any model's arithmetic can reach. ``int8=False`` leaves int8 out (seconds a call
    where the CPU has no VNNI)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    fns: dict[str, Callable[[], Any]] = {"fp32": lambda: a @ b}
    if cpu_info().bf16:
        ab, bb = a.bfloat16(), b.bfloat16()
        fns["bf16"] = lambda: ab @ bb
    if int8:
        qa, qb = torch.randint(-128, 127, (n, n), dtype=torch.int8), torch.randint(-128, 127, (n, n), dtype=torch.int8)
        fns["int8"] = lambda: torch._int_mm(qa, qb)
    return {k: 2 * n**3 / t / 1e9 for k, t in alternate(fns, repeats).items()}


def model_gmacs(model: nn.Module, shape: tuple[int, ...]) -> float | None:
    """GMACs of one call on ``shape`` (no batch), or None where the counter does not understand a
    peer model (the column stays empty)."""
    try:
        return complexity(model, shape).gmacs
    except Exception:
        return None


def infer(model: nn.Module, x: Any) -> Callable[[], Any]:
    """A call of ``model(x)`` in inference mode, to time."""

    def run() -> Any:
        with torch.inference_mode():
            return model(x)

    return run


def compare(
    s: Settings,
    suite: str,
    setting: str,
    models: dict[str, nn.Module],
    x: torch.Tensor,
    twins: dict[str, nn.Module] | None = None,
) -> None:
    """Check each peer against our model carrying its weights (``twins[peer]``, else the first
    contender), then time all contenders on ``x``. Our speed does not depend on the weights'
    values, so one of our instances is timed against every peer."""
    names = list(models)
    for n in names[1:]:
        if not n.startswith("torchvision"):
            check_twins((twins or {}).get(n, models[names[0]]), models[n], x[:1])
    # Batch 1 is quick and the noisiest (run-to-run spread of 20-50% here): twice the repeats.
    repeats = 2 * s.repeats if x.shape[0] == 1 else s.repeats
    times = alternate({n: infer(m, x) for n, m in models.items()}, repeats)
    for n in names:
        gm = model_gmacs(models[n if n.startswith("torchvision") else names[0]], tuple(x.shape[1:]))
        s.rows.append(Row(suite, setting, n, 1e3 * times[n], repeats, gmacs=None if gm is None else gm * x.shape[0]))


def machine() -> dict[str, str]:
    """The machine record at the top of RESULTS.md: CPU, cores, threads, versions, CPU flags."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchvision", "timm", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "absent"
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"), "cpu": cpu,
            "cores": str(os.cpu_count()), "threads": str(torch.get_num_threads()), **versions,
            "cpu flags": " ".join(f for f in CPU_FLAGS if f in cpu_info().flags) or "none of " + " ".join(CPU_FLAGS),
            "freed memory": "kept (pvt.runtime)" if runtime.keeps_freed_memory() else "returned to the OS"}  # fmt: skip


__all__ = [
    "PRECISIONS",
    "SUITE_MODULES",
    "Row",
    "Settings",
    "Suite",
    "alternate",
    "compare",
    "default_suites",
    "gemm_peaks",
    "infer",
    "machine",
    "model_gmacs",
    "register_suite",
    "suite",
    "suites",
]
