"""The HTTP API and the web page of ``pvt serve``: FastAPI on uvicorn, one model, dynamic batches.

``POST /v1/predict`` answers what ``pvt predict`` prints for that task (the task's own
``Predictor`` builds it), plus ``latency_ms``; a segmentation also carries the ``label_png`` and
``overlay_png`` of ``pvt predict --out`` as ``data:`` URLs instead of file paths. Uploads are
read into memory with a size cap and decoded from there: nothing a request sends is written to disk.
"""

from __future__ import annotations

import asyncio
import io
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import File, create_form_parser
from starlette.requests import ClientDisconnect
from torch import nn

from pvt.engine.config import Recipe
from pvt.engine.task import Predictor
from pvt.serve.batching import Batcher, Draining, QueueFull
from pvt.serve.observe import Metrics, Observed
from pvt.serve.security import KeyCheck

# ``submit(x)`` -> (the model's output for x, the size of the batch it ran in).
Submit = Callable[[torch.Tensor], Awaitable[tuple[Any, int]]]


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    max_upload_mb: float = 20.0
    max_queue: int | None = None  # None: four batches' worth, at least 16
    timeout_s: float = 60.0  # from a request's arrival to its answer; then 504
    grace_s: float = 30.0  # how long a shutdown waits for the work in flight; then 503
    api_keys: list[str] = field(default_factory=list, repr=False)
    insecure_public: bool = False
    log_format: str | None = None  # "text" / "json" access log lines on stderr; None: none

    def __post_init__(self) -> None:
        if self.max_queue is None:
            self.max_queue = max(4 * self.max_batch, 16)
        for name in ("max_batch", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        for name in ("timeout_s", "grace_s", "max_upload_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.log_format not in (None, "text", "json"):
            raise ValueError(f"--log-format is text or json, not {self.log_format!r}")


class ServeState:
    """What a shutdown changes: ``draining`` from the signal on; at the end of the grace period,
    every request still waiting for its batch is answered 503."""

    def __init__(self, batcher: Batcher[torch.Tensor, Any] | None) -> None:
        self.batcher = batcher
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.expired: int | None = None  # requests answered 503 when the grace ran out

    def start_draining(self, grace_s: float) -> None:
        """Called on the event loop when a shutdown begins."""
        self.draining = True
        if self.batcher is not None:
            self.batcher.hurry()  # no batch-mates will come: run what waits as soon as possible
        asyncio.get_running_loop().call_later(grace_s, self.expire)

    def expire(self) -> None:
        self.expired = 0 if self.batcher is None else self.batcher.close(Draining("the server is shutting down"))


NO_IMAGE = "no image: send it as a multipart file part (curl -F image=@photo.jpg) or as the raw request body"
# What the OpenAPI description says /v1/predict takes (the handler reads the body itself).
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"}}}
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def model_info(task: str, recipe: Recipe, model: nn.Module, predictor: Predictor) -> dict[str, Any]:
    """``GET /v1/model``: what is being served, for people and for the page (the predictor adds
    what its task has to say: ``Predictor.describe``)."""
    m: Any = recipe.model
    info: dict[str, Any] = {"task": task, "architecture": m.name, "classes": predictor.classes}
    info.update(predictor.describe(recipe))
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["weights"] = str(m.checkpoint) if m.checkpoint else f"pretrained: {m.pretrained}"
    return info


def create_app(predictor: Predictor, info: dict[str, Any], opts: ServeOptions, submit: Submit | None = None) -> FastAPI:
    """The app: ``/`` (the page), ``/healthz``, ``/metrics``, and ``/v1/model``, ``/v1/predict`` (which
    need a key when ``opts.api_keys`` has any). Batches with a :class:`Batcher` of its own unless
    ``submit`` is given (Ray Serve batches across its replicas' requests itself)."""
    batcher: Batcher[torch.Tensor, Any] | None = None
    state = ServeState(None)
    metrics = Metrics(lambda: batcher.depth if batcher is not None else 0, lambda: float(state.draining))
    if submit is None:
        batcher = Batcher(predictor.forward, max_batch=opts.max_batch, wait_s=opts.batch_wait_ms / 1000,
                          max_queue=opts.max_queue, on_batch=metrics.observe_batch)  # fmt: skip
        state.batcher = batcher
        submit = batcher.submit
    limit = int(opts.max_upload_mb * 1024 * 1024)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        if batcher is not None:
            batcher.start()
        yield
        if batcher is not None:
            await batcher.stop()

    app = FastAPI(title="pvt serve", version="1", lifespan=lifespan)
    app.state.serve = state
    info = {
        **info,
        "max_batch": opts.max_batch,
        "batch_wait_ms": opts.batch_wait_ms,
        "max_upload_mb": opts.max_upload_mb,
        "max_queue": opts.max_queue,
        "timeout_s": opts.timeout_s,
    }
    metrics.model.info({k: str(info[k]) for k in ("task", "architecture", "weights") if k in info})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return (resources.files("pvt.serve") / "static" / "index.html").read_text(encoding="utf-8")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Open to all (no key). 503 ``draining`` once a shutdown has begun, so a balancer stops sending."""
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    keyed = [Depends(KeyCheck(opts.api_keys))]  # every /v1 route

    @app.get("/v1/model", dependencies=keyed)
    async def model() -> dict[str, Any]:
        return info

    @app.post("/v1/predict", openapi_extra=PREDICT_BODY, dependencies=keyed)
    async def predict(request: Request) -> JSONResponse:
        """One image (multipart file part or raw body) -> the ``pvt predict`` record + ``latency_ms``."""
        start = time.perf_counter()
        if batcher is not None:
            try:
                batcher.check_room()  # refused before its body is read: the cheapest answer to a burst
            except QueueFull as e:
                raise _queue_full(metrics, e) from e
        try:
            body = await read_capped(request, limit)
        except ClientDisconnect as e:  # gone before its upload arrived: nothing to compute
            metrics.rejected.labels("disconnected").inc()
            raise HTTPException(499, "the client closed the connection") from e
        name, data = image_part(request.headers.get("content-type", ""), body)
        image = await run_in_threadpool(decode, data)
        x = await run_in_threadpool(predictor.prepare, image)
        output, batch = await answer_in_time(request, submit(x), start + opts.timeout_s, metrics)
        record = {"id": name, **await run_in_threadpool(predictor.record, name, output)}
        record.update(await run_in_threadpool(predictor.extras, x, output))  # e.g. a segmentation's pictures
        record["latency_ms"] = round(1000 * (time.perf_counter() - start), 2)
        return JSONResponse(record, headers={"X-Batch-Size": str(batch)})

    routes = {getattr(r, "path", "") for r in app.routes}
    app.add_middleware(Observed, metrics=metrics, routes=routes, log_format=opts.log_format)
    return app


async def answer_in_time(
    request: Request, work: Awaitable[tuple[Any, int]], deadline: float, metrics: Metrics
) -> tuple[Any, int]:
    """``work``'s result, unless the deadline passes (504) or the client goes away first: either
    way the work is cancelled, which drops it from the queue if its batch has not started."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, gone}, timeout=max(0.0, deadline - time.perf_counter()),
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    finally:
        gone.cancel()
    if task not in done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if gone in done:
            metrics.rejected.labels("disconnected").inc()
            raise HTTPException(499, "the client closed the connection")  # nobody reads it (nginx's code)
        metrics.rejected.labels("timeout").inc()
        raise HTTPException(504, "no answer within the server's --timeout-s; try again, or with fewer requests at once")
    try:
        return task.result()
    except QueueFull as e:
        raise _queue_full(metrics, e) from e
    except Draining as e:
        metrics.rejected.labels("draining").inc()
        raise HTTPException(503, f"{e}: try another server", headers={"Retry-After": "1"}) from e
    except ValueError as e:  # the model refuses this input (e.g. below its minimum size)
        raise HTTPException(422, f"cannot predict on this image: {e}") from e


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _queue_full(metrics: Metrics, e: QueueFull) -> HTTPException:
    metrics.rejected.labels("queue_full").inc()
    retry = str(max(1, math.ceil(e.retry_after_s)))
    return HTTPException(503, f"busy: {e}; retry after {retry} s", headers={"Retry-After": retry})


async def read_capped(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes: by its
    Content-Length before any of it is read, or while it streams in."""
    too_big = f"upload over the limit of {limit / 2**20:g} MiB (--max-upload-mb)"
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise HTTPException(413, too_big)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)


def image_part(content_type: str, body: bytes) -> tuple[str, bytes]:
    """(file name, bytes) of the image: the first file part of a multipart form, else the body."""
    if not content_type.lower().startswith("multipart/form-data"):
        if not body:
            raise HTTPException(400, NO_IMAGE)
        return "upload", body
    files: list[File] = []
    # Everything stays in memory (the body is already capped), never in a temporary file.
    try:
        parser = create_form_parser({"Content-Type": content_type.encode("latin-1", "replace")}, lambda field: None,
                                    files.append, config={"MAX_MEMORY_FILE_SIZE": float("inf")})  # fmt: skip
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as e:
        raise HTTPException(400, f"malformed multipart body: {e}") from e
    if not files:
        raise HTTPException(400, NO_IMAGE)
    part = files[0]
    part.file_object.seek(0)
    name = (part.file_name or b"upload").decode("utf-8", "replace")
    return name, part.file_object.read()


def decode(data: bytes) -> Image.Image:
    """RGB image from bytes, as ``pvt predict`` reads files; 415 if no image format is recognised,
    400 for a truncated or corrupt one or one over PIL's decompression-bomb limit."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS:
                # PIL itself refuses only beyond twice its limit (and warns below that).
                raise Image.DecompressionBombError(f"{w}x{h} = {w * h} pixels")
            return im.convert("RGB")
    except UnidentifiedImageError as e:
        raise HTTPException(415, "not an image PIL can read (JPEG, PNG, WebP, BMP, TIFF, GIF, ...)") from e
    except Image.DecompressionBombError as e:
        raise HTTPException(
            400, f"decompression bomb refused ({e}); the limit is {Image.MAX_IMAGE_PIXELS} pixels"
        ) from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise HTTPException(400, f"truncated or corrupt image: {e}") from e
