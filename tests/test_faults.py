"""Faults a cluster job meets (issue 13): resuming into an empty run folder, a truncated latest
checkpoint, a full disk while writing one, a hung rank, failing or killed data-loader workers and
an elastic restart."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import pytest
import torch

from pvt.cli import main as cli_main
from pvt.engine import state as ckpt_state

QUICK = ["train.progress=false", "train.log_every=1", "data.eval_batch_size=360", "data.batch_size=64",
         "schedule.warmup_iters=1", "train.checkpoint_every=2", "train.keep_checkpoints=3",
         "data.workers=0"]  # fmt: skip


def _train(run: Path, iterations: int, *extra: str) -> int:
    sets = [x for s in [*QUICK, f"schedule.iterations={iterations}"] for x in ("--set", s)]
    return cli_main(["train", "classification", "--preset", "digits", "--output", str(run), *sets, *extra])


def test_resume_into_an_empty_folder_starts_from_scratch(digits_cache: Path, tmp_path: Path, capsys) -> None:
    assert _train(tmp_path / "first", 2, "--resume") == 0  # a first elastic start passes --resume too
    assert "starting from scratch" in capsys.readouterr().out
    assert (tmp_path / "first" / "model.safetensors").is_file()


def test_a_truncated_latest_checkpoint_is_skipped(digits_cache: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert _train(run, 4) == 0
    found = ckpt_state.list_checkpoints(run)
    assert [p.name for p in found][-2:] == ["ckpt_00000002.pt", "ckpt_00000004.pt"]
    data = found[-1].read_bytes()
    found[-1].write_bytes(data[: len(data) // 2])  # a node died while the file system synced
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"skipping .*ckpt_00000004\.pt: unreadable"):
        assert _train(run, 6, "--resume") == 0
    assert "resuming from" in (out := capsys.readouterr().out) and "ckpt_00000002.pt (iteration 2" in out
    for p in ckpt_state.list_checkpoints(run):
        p.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipping"):
        assert _train(run, 8, "--resume") == 2
    assert "no readable checkpoint to resume from" in capsys.readouterr().err


def test_a_full_disk_keeps_the_previous_checkpoint(digits_cache: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    run = tmp_path / "full"
    real_save = torch.save

    def save(obj: object, f: str, *a: object, **k: object) -> None:
        if isinstance(obj, dict) and obj.get("iteration") == 4:
            with open(f, "wb") as out:  # part of the file, then the disk is full
                out.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_state.torch, "save", save)
    assert _train(run, 6) == 2
    err = capsys.readouterr().err
    assert f"{run / 'checkpoints'}: could not write ckpt_00000004.pt (No space left on device)" in err
    assert "--resume" in err
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["ckpt_00000002.pt"]  # the previous one, and no partial or temporary file
    assert ckpt_state.load_state(run / "checkpoints" / names[0])["iteration"] == 2


def _worker_pid(marker: str, rank: int) -> int | None:
    """The torchrun worker whose command line holds ``marker`` and whose environment says ``RANK``."""
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                env = (d / "environ").read_bytes().split(b"\0")
                if f"RANK={rank}".encode() in env and b"LOCAL_RANK" in b"".join(env):
                    return int(d.name)
        except OSError:
            continue
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_a_hung_rank_ends_the_job_after_dist_timeout(digits_cache: Path, tmp_path: Path) -> None:
    """One of two DDP processes stops answering (SIGSTOP): the other gives up after
    train.dist_timeout with a message, instead of waiting forever."""
    import queue
    import signal
    import subprocess
    import sys
    import threading
    import time

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "hang"
    sets = [*QUICK, "schedule.iterations=400", "train.dist_timeout=4", "train.checkpoint_every=1000"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(repo / "tests" / "ddp_worker.py"), str(out), "classification", "digits", *sets]  # fmt: skip
    env = {**os.environ, "PVT_CACHE": str(digits_cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()  # stderr, read as it comes
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr or ()], daemon=True).start()
    stopped = None
    try:
        log = out / "run" / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if log.is_file() and len(log.read_text().splitlines()) >= 2:
                stopped = _worker_pid(str(out), 1)
                break
            time.sleep(0.1)
        assert stopped is not None, "training did not start"
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.time()
        # Once rank 0 has given up, the stopped rank is let go on, so that torchrun's SIGTERM ends
        # it at once (a stopped process would hold torchrun 30 s before its SIGKILL).
        err, message = "", "another process did not answer within train.dist_timeout=4 s"
        while message not in err and time.time() - t0 < 120:
            with contextlib.suppress(queue.Empty):
                err += lines.get(timeout=1)
        assert message in err, err[-3000:]
        os.kill(stopped, signal.SIGCONT)
        assert proc.wait(timeout=60) != 0
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_a_bad_image_in_a_loader_worker_stops_the_run_naming_it(tmp_path: Path, capsys) -> None:
    """With train.workers > 0 the error raised in a worker process reaches the user with its file."""
    _image_folders(tmp_path)
    bad = tmp_path / "train" / "dog" / "9.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    sets = ["train.progress=false", "schedule.iterations=4", "data.batch_size=3", "data.workers=2",
            "model.num_classes=2", "data.eval_batch_size=8", "schedule.warmup_iters=1"]  # fmt: skip
    args = ["train", "classification", "--preset", "digits", "--data", str(tmp_path), "--output", str(tmp_path / "r")]
    assert cli_main([*args, *[x for s in sets for x in ("--set", s)]]) == 2
    assert f"{bad}: cannot read this image" in capsys.readouterr().err


def _image_folders(root: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (32, 32), (i * 40, 80 if c == "cat" else 160, 0)).save(root / split / c / f"{i}.png")


def test_a_killed_loader_worker_stops_the_run_with_a_message(tmp_path: Path, capsys, monkeypatch) -> None:
    """A worker killed by a signal (the OOM killer) raises no exception of its own: the run stops,
    not hangs, saying what happened, the last checkpoint and what to change."""
    import signal

    from PIL import Image

    _image_folders(tmp_path)
    opened = Image.open

    def open_or_die(fp, *a, **kw):  # runs in the forked worker processes
        if str(fp).endswith("dog/3.png") and os.environ.get("PVT_TEST_PARENT") != str(os.getpid()):
            os.kill(os.getpid(), signal.SIGKILL)
        return opened(fp, *a, **kw)

    monkeypatch.setenv("PVT_TEST_PARENT", str(os.getpid()))
    monkeypatch.setattr(Image, "open", open_or_die)
    sets = ["train.progress=false", "schedule.iterations=8", "data.batch_size=3", "data.workers=2",
            "model.num_classes=2", "data.eval_batch_size=8", "schedule.warmup_iters=1"]  # fmt: skip
    args = ["train", "classification", "--preset", "digits", "--data", str(tmp_path), "--output", str(tmp_path / "r")]
    assert cli_main([*args, *[x for s in sets for x in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert "DataLoader worker" in err and "was killed" in err and "rerun with --resume" in err, err


def _why(err: str) -> str:
    """What the ranks said when the job failed: every error line of every attempt (the tail alone
    shows only the last attempt, whose cause may lie in an earlier one), then the tail."""
    keys = ("error", "Error", "terminate", "Traceback", "exitcode", "Signal", "resuming", "restart")
    said = [line for line in err.splitlines() if any(k in line for k in keys) and "Grad strides" not in line]
    return "\n".join(said[:80]) + "\n--- tail ---\n" + err[-2000:]


def _elastic_cmd(run: Path, *torchrun: str) -> list[str]:
    import sys

    sets = [*QUICK, "schedule.iterations=12", "schedule.warmup_iters=2", "train.checkpoint_every=3",
            "train.deterministic=true", "data.batch_size=48"]  # fmt: skip
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *torchrun,
            "-m", "pvt.cli", "train", "classification", "--preset", "digits", "--output", str(run), "--resume",
            *[x for s in sets for x in ("--set", s)]]  # fmt: skip


def test_elastic_restart_resumes_both_ranks_bit_for_bit(digits_cache: Path, tmp_path: Path) -> None:
    """One rank SIGKILLed mid-epoch under torchrun --max-restarts: both ranks restart, resume from
    the last checkpoint by themselves, and end with the weights of an uninterrupted two-process run.

    Two restarts allowed, not one: once in a full CI run a restarted rank died in gloo ("terminate
    called without an active exception", SIGABRT) at its first backward, after which a second
    restart resumes as the first would have. A fault on every restart still fails the test."""
    import signal
    import subprocess
    import time

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PVT_CACHE": str(digits_cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_elastic_cmd(ref), env=env, cwd=repo, check=True, capture_output=True, timeout=600)
    run = tmp_path / "elastic"
    proc = subprocess.Popen(_elastic_cmd(run, "--max-restarts", "2"), env=env, cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        victim = None
        while time.time() < deadline and proc.poll() is None and victim is None:
            if (run / "checkpoints" / "ckpt_00000006.pt").exists():
                victim = _worker_pid(str(run), 1)
            time.sleep(0.02)
        assert victim is not None, "the run ended before a rank could be killed"
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, _why(err)
        assert "resuming from" in out
    finally:
        if proc.poll() is None:
            proc.kill()
    a, b = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
