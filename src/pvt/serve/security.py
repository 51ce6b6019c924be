"""API keys and where the server may listen.

Keys come from ``--api-key-file`` (one per line; blank lines and ``#`` comments skipped) or the
``PVT_API_KEY`` environment variable. A request to ``/v1/*`` must carry one as
``Authorization: Bearer KEY``; keys are compared in constant time, and every key is compared, so
the answer's timing tells nothing about which key came close.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

from fastapi import HTTPException, Request

ENV_KEY = "PVT_API_KEY"
MIN_KEY_CHARS = 16


def read_keys(path: str | Path | None) -> list[str]:
    """The keys of ``path`` (or of ``$PVT_API_KEY`` when no path is given); [] when neither is set."""
    if path is None:
        key = os.environ.get(ENV_KEY, "").strip()
        return [_checked(key, f"${ENV_KEY}")] if key else []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"cannot read the API key file {path}: {e.strerror or e}") from e
    keys = [_checked(line.strip(), f"{path}:{i}") for i, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")]  # fmt: skip
    if not keys:
        raise ValueError(f"the API key file {path} holds no key: write one per line (e.g. `openssl rand -hex 32`)")
    return keys


def _checked(key: str, where: str) -> str:
    if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
        raise ValueError(
            f"the API key at {where} is too short or contains spaces: use at least {MIN_KEY_CHARS} characters "
            "without spaces, e.g. the output of `openssl rand -hex 32`"
        )
    return key


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server to this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_exposure(host: str, keys: list[str], insecure_public: bool) -> None:
    """Refuse to serve without keys on an address other machines can reach, unless told to."""
    if not keys and not insecure_public and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host} without API keys: anyone who reaches the port could use it. "
            f"Give --api-key-file FILE (or ${ENV_KEY}), or --insecure-public if a proxy in front checks callers"
        )


class KeyCheck:
    """A FastAPI dependency: 401 unless the request's bearer token is one of the keys."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = [k.encode() for k in keys]

    def __call__(self, request: Request) -> None:
        if not self.keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # Every key compared, none skipped: how long this takes does not depend on which one matched.
        matched = [hmac.compare_digest(given, k) for k in self.keys]
        if not any(matched):
            why = "wrong API key" if given else "an API key is needed: send the header Authorization: Bearer KEY"
            raise HTTPException(401, why, headers={"WWW-Authenticate": "Bearer"})
