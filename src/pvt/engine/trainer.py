"""The training loop every task shares: AdamW, schedules, precision, DDP, checkpoints, logging.

A run directory holds ``config.yaml`` (the resolved recipe), ``metrics.jsonl``, ``checkpoints/``,
``model.safetensors`` (final weights) and ``final.json`` (headline metrics, percent).
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset

import pvt.engine.state as ckpt
from pvt.checkpoint.io import save_safetensors
from pvt.engine.amp import autocast_factory, resolve_amp
from pvt.engine.config import Recipe
from pvt.engine.data import ResumableSampler, SeededDataset
from pvt.engine.distributed import (
    DistInfo,
    RankTimeout,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    cleanup,
    gather_objects,
    init_distributed,
    is_collective_failure,
)
from pvt.engine.optim import Schedule, build_optimizer, scaled_lr
from pvt.engine.runs import ARTIFACTS, RUN_CONFIG, WEIGHTS
from pvt.engine.task import LoaderConfig, Task
from pvt.utils.files import atomic_write


def set_determinism(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class MetricsLog:
    """Append-only JSON lines, rank 0 only; truncated back to a checkpoint on resume."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, iteration: int) -> None:
        if not (self.enabled and self.path.exists()):
            return
        keep = [ln for ln in self.path.read_text().splitlines() if json.loads(ln).get("iteration", 0) <= iteration]
        text = "".join(ln + "\n" for ln in keep)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint at the next step boundary and exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class LoaderWorkerDied(RuntimeError):
    """A data-loader worker process died without an exception of its own (killed by a signal)."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or Inf; raised on every rank before the step that would
    have applied it, so the run directory keeps only checkpoints of good weights."""


class Trainer:
    """Runs one recipe for one task in ``run_dir``; ``fit()`` returns the final metrics."""

    def __init__(self, task: Task, recipe: Recipe, run_dir: str | Path, *, resume: bool = False) -> None:
        self.task, self.recipe, self.run_dir = task, recipe, Path(run_dir)
        self.resume = resume
        self.dist: DistInfo = init_distributed(recipe.train.device, recipe.train.dist_timeout)
        self.device = self.dist.device
        tc = recipe.train
        set_determinism(tc.seed + self.dist.rank, tc.deterministic)
        if self.dist.is_main:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            recipe.dump(self.run_dir / RUN_CONFIG)
        barrier(self.dist)
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", self.dist.is_main)
        self.amp, self.amp_reason = resolve_amp(tc.amp, self.device)
        self.autocast = autocast_factory(self.amp, self.device)
        if self.dist.is_main:
            shown = "fp32" if self.amp == "none" else f"{self.amp} autocast, fp32 weights and optimizer state"
            print(f"precision: {shown} (train.amp={tc.amp}: {self.amp_reason})", flush=True)

    # -- construction ---------------------------------------------------------------------

    def _loaders(self, train_ds: Dataset[Any], eval_ds: Dataset[Any]) -> None:
        dc: LoaderConfig = self.recipe.data
        rank, world, seed = self.dist.rank, self.dist.world_size, self.recipe.train.seed
        repeats = int(getattr(dc, "repeated_aug", 1))
        n = len(train_ds)  # type: ignore[arg-type]
        groups = self.task.group_ids(train_ds)
        self.sampler = ResumableSampler(
            n, seed=seed, rank=rank, world_size=world, repeats=repeats, groups=groups, batch_size=dc.batch_size
        )
        self.train_loader = DataLoader(
            SeededDataset(train_ds),
            batch_size=dc.batch_size,
            sampler=self.sampler,
            num_workers=dc.workers,
            collate_fn=self.task.collate,
            drop_last=True,
            generator=torch.Generator(),  # keeps the global RNG untouched by loader start-up
            persistent_workers=False,
        )
        if len(self.train_loader) == 0:
            raise ValueError(
                f"data.batch_size={dc.batch_size} exceeds the {self.sampler.per_rank} training samples "
                "per process; lower data.batch_size"
            )
        self.eval_loader = make_eval_loader(self.task, eval_ds, dc, self.dist)

    def _build(self) -> None:
        r = self.recipe
        train_ds, eval_ds = self.task.build_datasets(r)
        assert train_ds is not None
        self._loaders(train_ds, eval_ds)
        model = self.task.build_model(r).to(self.device)
        if r.train.grad_checkpointing:
            _set_grad_checkpointing(model)
        self.model = model
        self.ema = (
            AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(r.train.ema_decay), use_buffers=True)
            if r.train.ema_decay
            else None
        )
        accum = r.optim.accum_steps
        self.iters_per_epoch = len(self.train_loader) // accum
        if self.iters_per_epoch == 0:
            raise ValueError("optim.accum_steps is larger than the number of batches per epoch")
        total_batch = r.data.batch_size * self.dist.world_size * accum
        self.total_iters = r.schedule.iterations or r.schedule.epochs * self.iters_per_epoch
        self.epochs = -(-self.total_iters // self.iters_per_epoch)
        self.base_lr = scaled_lr(r.optim, total_batch)
        self.optimizer = build_optimizer(model, r.optim, self.base_lr, **self.task.param_group_kwargs())
        self.schedule = Schedule(r.schedule, self.base_lr, self.total_iters, self.iters_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == "fp16")
        forward_model: nn.Module = model
        if self.dist.enabled:
            forward_model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if r.train.compile:
            forward_model = torch.compile(forward_model)  # type: ignore[assignment]
        self.forward_model = forward_model
        self.tb = self._tensorboard() if r.train.tensorboard and self.dist.is_main else None
        if self.dist.is_main:
            text = json.dumps(self.task.artifacts(), indent=2) + "\n"
            atomic_write(self.run_dir / ARTIFACTS, lambda tmp: Path(tmp).write_text(text))

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise RuntimeError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from e
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # -- checkpoints ----------------------------------------------------------------------

    def _state(self, epoch: int, position: int) -> dict[str, Any]:
        return {
            "iteration": self.schedule.iteration,
            "epoch": epoch,
            "position": position,  # samples of this epoch already consumed, per rank
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": ckpt.rng_state(),
            "world_size": self.dist.world_size,
            "amp": self.amp,  # the arithmetic that ran (train.amp=auto differs between machines)
        }

    def _save(self, epoch: int, position: int) -> None:
        # Every rank's RNG differs, but ranks start from seed + rank and consume in lock step;
        # rank 0's file is the run's checkpoint and each rank restores its own stream on resume.
        state = self._state(epoch, position)
        if self.dist.enabled:
            state["rng_all"] = gather_objects(state["rng"], self.dist)
        if self.dist.is_main:
            ckpt.save_state(ckpt.checkpoint_path(self.run_dir, self.schedule.iteration), state)
            ckpt.prune_checkpoints(self.run_dir, self.recipe.train.keep_checkpoints)
        barrier(self.dist)

    def _restore(self) -> tuple[int, int]:
        found = ckpt.latest_readable_state(self.run_dir)
        if found is None:
            if self.dist.is_main:
                print(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'} yet, starting from scratch")
            return 0, 0
        path, state = found
        if state.get("world_size", 1) != self.dist.world_size:
            raise RuntimeError(
                f"{path} was written by {state.get('world_size')} processes; resume with the same "
                f"--nproc_per_node (now {self.dist.world_size}) for an exact continuation"
            )
        if state.get("amp", self.amp) != self.amp and self.dist.is_main:
            warnings.warn(
                f"{path} was trained with amp={state['amp']} and continues with amp={self.amp} "
                f"({self.amp_reason}): the continuation is not bit-exact; set train.amp={state['amp']} for that",
                stacklevel=2,
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self._pending_rng = state["rng_all"][self.dist.rank] if "rng_all" in state else state["rng"]
        self.log.truncate_after(self.schedule.iteration)
        if self.dist.is_main:
            print(f"resuming from {path} (iteration {self.schedule.iteration}, epoch {state['epoch']})")
        return int(state["epoch"]), int(state["position"])

    # -- the loop -------------------------------------------------------------------------

    def _batches(self, epoch: int, position: int) -> Iterator[Any]:
        self.sampler.set_epoch(epoch, position)
        it = iter(self.train_loader)
        # Restore the RNG after the loader has started, exactly where the checkpoint left it.
        if getattr(self, "_pending_rng", None) is not None:
            ckpt.set_rng_state(self._pending_rng)
            self._pending_rng = None
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if "DataLoader worker" not in str(e):
                    raise
                # Killed workers leave no file name behind (an exception in one arrives with its own).
                last = ckpt.latest_checkpoint(self.run_dir)
                raise LoaderWorkerDied(
                    f"{e} (epoch {epoch + 1}, after iteration {self.schedule.iteration}): a data-loader worker "
                    "process was killed, most often by the out-of-memory killer (see dmesg); "
                    f"{f'the last checkpoint is {last}' if last else 'no checkpoint had been written yet'}. "
                    "Lower data.workers or data.batch_size and rerun with --resume"
                ) from e
            yield batch

    def _train_epoch(self, epoch: int, position: int, stop: _StopFlag) -> bool:
        """Returns False when interrupted by a signal (after checkpointing)."""
        r, accum = self.recipe, self.recipe.optim.accum_steps
        bs = r.data.batch_size
        steps_done = position // (bs * accum)
        remaining = min(self.iters_per_epoch - steps_done, self.total_iters - self.schedule.iteration)
        desc, on = f"epoch {epoch + 1}/{self.epochs}", self.dist.is_main and r.train.progress
        bar = _progress(remaining, desc, on, r.train.log_every)
        self.model.train()
        micro, t0, seen = 0, time.perf_counter(), 0
        loss_sum = torch.zeros((), device=self.device)
        waits = _Waits()  # the time steps spent blocked on the loader: the data must never keep them waiting
        for batch in waits.timed(self._batches(epoch, position)):
            # Leftover micro-batches (fewer than accum_steps) never leak into the next epoch.
            if self.schedule.iteration >= self.total_iters or steps_done >= self.iters_per_epoch:
                break
            lr = self.schedule.apply(self.optimizer)
            sync = (micro + 1) % accum == 0
            ctx = self.forward_model.no_sync() if (self.dist.enabled and not sync) else contextlib.nullcontext()  # type: ignore[operator]
            with ctx:
                with self.autocast():
                    loss = self.task.loss(self.forward_model, batch, self.device)
                # A non-finite loss is checked at the step below, on every rank at once: a rank
                # raising here alone would leave the others waiting in the gradient all-reduce.
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
            micro += 1
            seen += bs
            position += bs
            if not sync:
                continue
            self._check_loss(loss_sum)  # before the step: the weights stay those of the last good one
            if r.optim.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.optim.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.schedule.step()
            steps_done += 1
            it = self.schedule.iteration
            mean_loss = (loss_sum / accum).item()
            loss_sum.zero_()
            throughput = seen * self.dist.world_size / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{throughput:.1f}")
            bar.update(1)
            waits.steps += 1
            if it % r.train.log_every == 0 or it == self.total_iters:
                rec = {"type": "train", "epoch": epoch, "iteration": it, "loss": mean_loss, "lr": lr,
                       "img_s": throughput, "data_wait_ms": waits.take_mean_ms()}  # fmt: skip
                self.log.write(rec)
                if self.tb is not None:
                    for k in ("loss", "lr", "img_s"):
                        self.tb.add_scalar(f"train/{k}", rec[k], it)
            if it % r.train.checkpoint_every == 0 and steps_done < self.iters_per_epoch:
                self._save(epoch, position)
            if self._should_stop(stop):
                self._save(epoch, position)
                bar.close()
                return False
        bar.close()
        return True

    def _check_loss(self, loss_sum: torch.Tensor) -> None:
        """Raise ``NonFiniteLoss`` on every rank when any rank's loss of this step is NaN or Inf.

        Only the loss counts: under fp16 the grad scaler skips steps with inf *gradients* by design.
        """
        bad = (~torch.isfinite(loss_sum.detach().float())).float().reshape(1)
        all_reduce_sum(bad, self.dist)  # the loss is per rank; every rank must stop at this step
        if bad.item() > 0:
            local = float(loss_sum)
            value = f"{local}" if not torch.isfinite(loss_sum) else f"NaN or Inf on another process (here {local:.4g})"
            raise NonFiniteLoss(self._nonfinite_message(value))

    def _nonfinite_message(self, value: str) -> str:
        o = self.recipe.optim
        last = ckpt.latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
        clip = 1.0 if o.clip_grad is None else o.clip_grad / 10
        return (
            f"loss is {value} at iteration {self.schedule.iteration + 1} of {self.total_iters} (the training "
            f"diverged); stopped before that step's update and wrote nothing after it: {kept}. Rerun the same "
            f"command with --resume and a lower learning rate (--set optim.lr={o.lr / 10:g}, now {o.lr:g}) or "
            f"gradient clipping (--set optim.clip_grad={clip!r})"
        )

    def _should_stop(self, stop: _StopFlag) -> bool:
        """Whether any rank got a signal: every rank must stop at the same step to checkpoint."""
        flag = torch.tensor([float(stop.signum is not None)], device=self.device)
        if self.dist.enabled:
            all_reduce_sum(flag, self.dist)
            if flag.item() > 0 and stop.signum is None:
                stop.signum = signal.SIGTERM
        return bool(flag.item() > 0)

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        m = model if model is not None else self.model
        m.eval()
        broadcast_buffers(m, self.dist)
        with torch.inference_mode():
            return self.task.evaluate(m, self.eval_loader, self.device, self.dist, self.autocast)

    def fit(self) -> dict[str, float]:
        self._build()
        epoch, position = self._restore() if self.resume else (0, 0)
        self.log.write({"type": "run", "iteration": self.schedule.iteration, "amp": self.amp,
                        "amp_asked": self.recipe.train.amp, "amp_reason": self.amp_reason,
                        "resumed": self.schedule.iteration > 0})  # fmt: skip
        metrics: dict[str, float] = {}
        try:
            with _StopFlag() as stop:
                while self.schedule.iteration < self.total_iters:
                    if not self._train_epoch(epoch, position, stop):
                        sig = signal.Signals(stop.signum or signal.SIGTERM).name
                        if self.dist.is_main:
                            print(f"{sig}: checkpointed iteration {self.schedule.iteration}; continue with --resume")
                        sys.exit(128 + int(stop.signum or signal.SIGTERM))
                    epoch, position = epoch + 1, 0
                    last = self.schedule.iteration >= self.total_iters
                    if last or epoch % self.recipe.train.eval_every == 0:
                        metrics = self._eval_and_log(epoch)
                    self._save(epoch, 0)
            self._finish(metrics)
        except RuntimeError as e:
            if not (self.dist.enabled and is_collective_failure(e)):
                raise
            raise RankTimeout(
                f"rank {self.dist.rank}: another process did not answer within train.dist_timeout="
                f"{self.recipe.train.dist_timeout:g} s (it hung or died) at iteration {self.schedule.iteration}; "
                f"the job stops. Continue with --resume from the last checkpoint in {self.run_dir / 'checkpoints'}"
            ) from e
        finally:
            if self.tb is not None:
                self.tb.close()
            cleanup(self.dist)
        return metrics

    def _eval_and_log(self, epoch: int) -> dict[str, float]:
        metrics = self.evaluate()
        if self.ema is not None:
            ema_metrics = self.evaluate(self.ema.module)
            metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
        self.log.write({"type": "eval", "epoch": epoch, "iteration": self.schedule.iteration, **metrics})
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"eval/{k}", v, self.schedule.iteration)
        if self.dist.is_main:
            shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k in self.task.headline)
            print(f"epoch {epoch}: {shown}", flush=True)
        return metrics

    def _finish(self, metrics: dict[str, float]) -> None:
        if not self.dist.is_main:
            return
        arch = getattr(self.model, "arch", None)
        final_model = self.ema.module if self.ema is not None else self.model
        # A model may name what rebuilding it needs beyond its tensors (a detector's semantics).
        extra = getattr(self.model, "checkpoint_metadata", None)
        save_safetensors(final_model.state_dict(), self.run_dir / WEIGHTS, arch=arch, metadata=extra)
        final = {k: round(float(metrics[k]), 4) for k in self.task.headline if k in metrics}
        final_json: dict[str, Any] = {**final, "iterations": self.schedule.iteration, "task": self.task.name}
        text = json.dumps(final_json, indent=2) + "\n"
        atomic_write(self.run_dir / "final.json", lambda tmp: Path(tmp).write_text(text))


def make_eval_loader(task: Task, eval_ds: Dataset[Any], dc: LoaderConfig, info: DistInfo) -> DataLoader[Any]:
    """Each rank evaluates its own contiguous shard; tasks reduce their metrics across ranks."""
    n = len(eval_ds)  # type: ignore[arg-type]
    per = -(-n // info.world_size)
    indices = list(range(info.rank * per, min(n, (info.rank + 1) * per)))
    subset = torch.utils.data.Subset(eval_ds, indices)
    return DataLoader(
        subset,
        batch_size=dc.eval_batch_size or max(1, int(dc.batch_size * 1.5)),
        shuffle=False,
        num_workers=dc.workers,
        collate_fn=task.collate,
        generator=torch.Generator(),  # evaluation never draws from the training RNG
    )


def _set_grad_checkpointing(model: nn.Module) -> None:
    """Turn it on in the first module that supports it (the PVT backbone)."""
    for m in model.modules():
        fn = getattr(m, "set_grad_checkpointing", None)
        if callable(fn):
            fn(True)
            return


class _Waits:
    """Seconds spent waiting for batches, per optimizer step since the last read."""

    def __init__(self) -> None:
        self.seconds, self.steps = 0.0, 0

    def timed(self, batches: Iterator[Any]) -> Iterator[Any]:
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - start
            yield batch

    def take_mean_ms(self) -> float:
        mean = 1e3 * self.seconds / max(self.steps, 1)
        self.seconds, self.steps = 0.0, 0
        return round(mean, 3)


class _NoBar:
    def set_postfix(self, **kw: Any) -> None: ...
    def update(self, n: int = 1) -> None: ...
    def close(self) -> None: ...


class _PlainLines:
    """Progress for a log file or pipe: one plain line every ``every`` steps (a tqdm bar there
    would write carriage-return frames)."""

    def __init__(self, total: int, desc: str, every: int) -> None:
        self.total, self.desc, self.every, self.n = total, desc, max(every, 1), 0
        self.postfix: dict[str, Any] = {}

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = kw

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            fields = " ".join(f"{k} {v}" for k, v in self.postfix.items())
            print(f"{self.desc}: {self.n}/{self.total} {fields}".rstrip(), file=sys.stderr, flush=True)

    def close(self) -> None: ...


def _progress(total: int, desc: str, enabled: bool, every: int) -> Any:
    """A tqdm bar on a terminal, plain lines every ``every`` steps otherwise, nothing when off."""
    if not enabled:
        return _NoBar()
    if not sys.stderr.isatty():
        return _PlainLines(total, desc, every)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)


def run_evaluation(
    task: Task,
    recipe: Recipe,
    prepare: Callable[[nn.Module, torch.device], nn.Module] | None = None,
    model: nn.Module | None = None,
) -> dict[str, float]:
    """``pvt eval``: evaluate ``recipe.model.checkpoint`` (or ``model``, e.g. an exported file in
    ONNX Runtime) on the task's evaluation set. ``prepare`` (e.g. ``pvt.optimize_for_inference`` at
    a precision) replaces the recipe's autocast."""
    info = init_distributed(recipe.train.device)
    try:
        _, eval_ds = task.build_datasets(recipe, train=False)
        loader = make_eval_loader(task, eval_ds, recipe.data, info)
        model = (task.build_model(recipe) if model is None else model).to(info.device).eval()
        autocast = autocast_factory(resolve_amp(recipe.train.amp, info.device)[0], info.device)
        if prepare is not None:
            model, autocast = prepare(model, info.device), contextlib.nullcontext
        with torch.inference_mode():
            return task.evaluate(model, loader, info.device, info, autocast)
    finally:
        cleanup(info)


__all__ = [
    "LoaderWorkerDied",
    "NonFiniteLoss",
    "Trainer",
    "all_reduce_sum",
    "autocast_factory",
    "make_eval_loader",
    "run_evaluation",
]
