"""Fetching a published weights file through the ecosystem's clients, checked and atomic.

* ``hf`` rows: ``huggingface_hub.hf_hub_download`` into the Hugging Face cache, so ``HF_HOME``,
  ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` mean what they mean everywhere else.
  The row's files are asked for in order (``model.safetensors``, then ``pytorch_model.bin``, as
  transformers does): a file the repository does not have (404) moves on to the next, any other
  error stops there. The table's sha256 is that of the first file; a fallback file is taken with
  huggingface_hub's size check only, and a warning when the row has a checksum it cannot apply.
* ``url`` rows: ``torch.hub.download_url_to_file`` into ``$PVT_CACHE/weights`` (default
  ``~/.cache/pvt-vision/weights``), to a temporary name in that folder, renamed only after the
  sha256 check (full digest or known prefix) passed: a corrupt or partial download is never used
  and never left behind. The digest of every downloaded file is stamped beside it
  (``FILE.sha256``) and a cached file is checked against it (or the table's checksum) on each use.
* ``gdrive`` rows are never downloaded (Drive is not scriptable): the error says where to get the
  file and where to put it, and ``resolve`` then finds it there.

A copy placed by hand at ``local_path(source)`` is always used first, for every host: that is
how an air-gapped machine is served (``pvt download ... --to DIR`` on a connected one, then copy
``DIR`` to ``$PVT_CACHE/weights``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any

from pvt.checkpoint import CheckpointError
from pvt.hub.sources import WeightsSource
from pvt.utils.cache import cache_dir

_TRUE = {"1", "on", "yes", "true"}
# Exceptions of the HTTP stacks the clients use that mean "could not reach the file".
_TRANSPORT_MODULES = {"http", "urllib", "urllib3", "requests", "httpx", "httpx2", "httpcore", "socket", "ssl"}


class WeightsUnavailable(CheckpointError):
    """A published weights file that cannot be had right now (offline, unreachable, or a file that
    must be downloaded by hand). The message names the file, its URL and the local path where a
    manually downloaded copy is picked up."""


class ManualDownloadRequired(WeightsUnavailable):
    """A file on Google Drive: a person downloads it once and puts it where the message says."""


def weights_dir() -> Path:
    """``$PVT_CACHE/weights`` (``~/.cache/pvt-vision/weights`` by default)."""
    return cache_dir() / "weights"


def local_name(source: WeightsSource, filename: str | None = None) -> str:
    """The file's name in ``weights_dir()`` (hf rows: ``owner--repo--file``, unique across repos;
    ``filename`` is one of the row's ``filenames``, its first by default)."""
    if source.host == "hf":
        return f"{source.location.replace('/', '--')}--{filename or source.filename}"
    return source.filename


def local_path(source: WeightsSource, filename: str | None = None) -> Path:
    """Where ``url`` rows are cached and where a copy downloaded by hand is picked up (any host;
    for hf rows, under the name of whichever of its ``filenames`` the copy is)."""
    return weights_dir() / local_name(source, filename)


def is_cached(source: WeightsSource) -> bool:
    """Whether ``resolve`` would find the file without the network (nothing is verified here)."""
    if any(local_path(source, f).is_file() for f in source.filenames):
        return True
    if source.host != "hf":
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(source.location, f), str) for f in source.filenames)


def resolve(source: WeightsSource, *, progress: bool = True) -> Path:
    """The local path of ``source``'s file, downloading it first if needed.

    An hf row's files are tried in order (``source.filenames``): the first the repository has is
    the one used, ``.safetensors`` or ``.bin`` (``pvt.load_checkpoint`` reads both).

    Raises ``WeightsUnavailable`` when it is not cached and cannot be fetched (offline, connection
    error, HTTP error, a repository with none of the files), ``ManualDownloadRequired`` for
    Google-Drive rows not placed yet, and ``CheckpointError`` when a file's sha256 does not match.
    """
    return _resolve(source, progress)[0]


def _resolve(source: WeightsSource, progress: bool) -> tuple[Path, str]:
    """``resolve``'s path, and which of ``source.filenames`` it holds."""
    for filename in source.filenames:
        manual = local_path(source, filename)
        if manual.is_file():
            _verify_cached(manual, source, filename)
            return manual, filename
    if source.host == "gdrive":
        raise ManualDownloadRequired(manual_download_message(source))
    if source.host == "url":
        return _fetch_url(source, local_path(source), progress), source.filename
    if source.host == "hf":
        return _fetch_hf(source)
    raise ValueError(f"{source.name}: unknown host kind {source.host!r}")


def manual_download_message(source: WeightsSource) -> str:
    """Where a Google-Drive file is published and where to save it."""
    what = f"the authors' {source.arch} ({source.task}, {source.metric_text()}) for {source.model}"
    return (
        f"{source.name}: {what} is published on Google Drive only, which cannot be downloaded by a script. "
        f"Download it from the link in {source.location} (README), save it as {local_path(source)} "
        f"and run again, or pass the file as checkpoint=FILE (--checkpoint FILE)."
        + (f" Note: {source.note}." if "error" in source.note else "")
    )


def fetch_to(source: WeightsSource, folder: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """``resolve`` and copy the file into ``folder`` under its ``local_name`` (atomically): a folder
    of such files can be copied to ``$PVT_CACHE/weights`` on a machine without the internet."""
    src, filename = _resolve(source, progress)
    dst = Path(folder) / local_name(source, filename)
    if dst.resolve() == src.resolve():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (read now, and as huggingface_hub read it): no request is made for any host."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(constants is not None and constants.is_offline_mode())


def _unavailable(source: WeightsSource, reason: str) -> WeightsUnavailable:
    hint = ""
    others = ", ".join(source.fallbacks)
    if source.host == "hf":
        hint = (
            f", or fill the Hugging Face cache (HF_HOME / HF_HUB_CACHE) on a connected machine with "
            f"`hf download {source.location} {source.filename}`" + (f" (or {others})" if others else "")
        )
    what = source.filename + (f" (or {others}, where the repository has no {source.filename})" if others else "")
    where = " or ".join(str(local_path(source, f)) for f in source.filenames)
    return WeightsUnavailable(
        f"{source.name}: {what} is not cached and cannot be fetched from {source.url} ({reason}). "
        f"Download it where the internet is reachable (`pvt download {source.name} --to DIR`) and place it at "
        f"{where}{hint}, or pass a local file as checkpoint=FILE (--checkpoint FILE)."
    )


def _none_on_hub(source: WeightsSource) -> WeightsUnavailable:
    """A repository that has none of the row's files (each answered 404)."""
    names = source.filenames
    which = f"no {names[0]}" if len(names) == 1 else "neither " + " nor ".join(names)
    urls = ", ".join(source.file_url(f) for f in names)
    return WeightsUnavailable(
        f"{source.name}: the Hugging Face repository {source.location} has {which} (404 Not Found for {urls}); "
        f"it changed since the weights table was written, or the HF_ENDPOINT mirror lacks them. Choose another tag "
        f"(`pvt weights {source.model}`), or pass a local file as checkpoint=FILE (--checkpoint FILE)."
    )


def _missing_on_hub(e: BaseException) -> bool:
    """Whether ``hf_hub_download`` failed because the repository has no such file: the hub's
    ``EntryNotFound`` (``RemoteEntryNotFoundError``; ``EntryNotFoundError`` before huggingface_hub
    1.0), or a plain 404 (a mirror without the hub's error headers, which huggingface_hub reports
    as a ``LocalEntryNotFoundError`` caused by it). Not a missing repository or revision, not
    ``LocalEntryNotFoundError`` itself (offline, unreachable: the file may well exist)."""
    import importlib

    errors = importlib.import_module("huggingface_hub.utils")  # where every version exports them
    cause: BaseException | None = e
    for _ in range(4):  # the exception and the causes it was raised from
        if cause is None or isinstance(cause, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)):
            return False
        if isinstance(cause, errors.EntryNotFoundError) and not isinstance(cause, errors.LocalEntryNotFoundError):
            return True
        if getattr(getattr(cause, "response", None), "status_code", None) == 404:
            return True
        cause = cause.__cause__
    return False


def _is_transport_error(e: BaseException) -> bool:
    """Network trouble (offline, refused, reset, HTTP errors), not a local filesystem problem."""
    if isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return isinstance(e, OSError) or any(
        c.__module__.split(".")[0] in _TRANSPORT_MODULES for c in type(e).__mro__ if c not in (Exception, BaseException)
    )


def _check_digest(digest: str, source: WeightsSource, path: Path, what: str) -> None:
    if source.sha256 and not digest.startswith(source.sha256.lower()):
        raise CheckpointError(
            f"{source.name}: {what} {path.name} has sha256 {digest[:16]}... but the published file's "
            f"starts with {source.sha256[:16]}; it is corrupt or not the published file"
        )


def _verify_cached(path: Path, source: WeightsSource, filename: str) -> None:
    """Check a cached copy of ``filename`` (one of the row's ``filenames``) against the table's
    checksum where it is that file's (the row's first), else against its own download stamp."""
    stamp = path.with_name(path.name + ".sha256")
    table = source.sha256 if filename == source.filename else None
    expected = table or (stamp.read_text().strip() if stamp.is_file() else None)
    if not expected:
        return
    digest = sha256_file(path)
    if not digest.startswith(expected.lower()):
        raise CheckpointError(
            f"{path}: sha256 {digest[:16]}... does not match the expected {expected[:16]}... (a corrupt or "
            f"different file); delete it and run again to download {source.name} afresh"
        )


def _fetch_url(source: WeightsSource, dst: Path, progress: bool) -> Path:
    """torch.hub download to a temporary name beside ``dst``; rename after the checksum passed."""
    import torch.hub

    if offline():
        raise _unavailable(source, "offline: HF_HUB_OFFLINE is set")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.download")
    try:
        try:
            torch.hub.download_url_to_file(source.url, str(tmp), progress=progress)
        except Exception as e:
            if _is_transport_error(e):
                raise _unavailable(source, f"{type(e).__name__}: {e}") from e
            raise
        if not _complete(tmp, dst.suffix):
            raise _unavailable(source, "the download was cut short (connection dropped?); nothing was kept")
        digest = sha256_file(tmp)
        _check_digest(digest, source, tmp, "the download of")
        # The stamp first: a file without its stamp would be used unverified; a stamp alone is inert.
        dst.with_name(dst.name + ".sha256").write_text(digest + "\n")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _complete(path: Path, suffix: str) -> bool:
    """Whether a downloaded checkpoint is whole. urllib (under torch.hub) returns a body cut short
    by a dropped connection without an error, and most release files carry no checksum, so the
    file's own structure is checked: a zip (torch.save) ends with its central directory, a
    safetensors header gives the data's length, anything else must unpickle (weights only)."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                return z.testzip() is None
        except (zipfile.BadZipFile, OSError, EOFError):
            return False
    size = path.stat().st_size
    if suffix == ".safetensors":
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
            except ValueError:
                return False
        if not isinstance(header, dict):
            return False
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return size == 8 + n + max(ends, default=0)
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated pickle can raise almost anything
        return False
    return True


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as e:
        raise CheckpointError(
            "huggingface_hub is needed for Hugging Face hub weights: pip install 'pvt-vision[hub]' "
            "(or choose the 'official' tag)"
        ) from e
    return huggingface_hub


def _fetch_hf(source: WeightsSource) -> tuple[Path, str]:
    """The Hugging Face cache's copy of the first of ``source.filenames`` it holds (no request),
    else ``hf_hub_download`` of each in turn: a file the repository does not have (404) moves on
    to the next, any other error is raised. Returns the path and which file it is."""
    hub = _hub()
    for filename in source.filenames:
        cached = hub.try_to_load_from_cache(source.location, filename)
        if isinstance(cached, str):
            _verify_cached(Path(cached), source, filename)
            return Path(cached), filename
    if offline():
        raise _unavailable(source, "offline: HF_HUB_OFFLINE is set")
    for filename in source.filenames:
        try:
            path = Path(hub.hf_hub_download(source.location, filename))
        except Exception as e:
            if _missing_on_hub(e):
                continue
            if _is_transport_error(e):
                raise _unavailable(source, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
            raise
        if filename == source.filename:
            _check_hf_digest(source, path)
        elif source.sha256:
            warnings.warn(
                f"{source.name}: {source.location} has no {source.filename}, so its {filename} is used; the "
                f"table's sha256 ({source.sha256}) is that of {source.filename} and was not checked "
                f"(huggingface_hub checked the download's size)",
                stacklevel=4,
            )
        return path, filename
    raise _none_on_hub(source)


def _check_hf_digest(source: WeightsSource, path: Path) -> None:
    """The table's checksum of the row's first file, on its fresh download into the hub cache."""
    if source.sha256:
        digest = sha256_file(path)
        if not digest.startswith(source.sha256.lower()):
            # Take the bad blob out of the cache so the next call downloads it again.
            blob = path.resolve()
            path.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
            _check_digest(digest, source, path, "the download of")
