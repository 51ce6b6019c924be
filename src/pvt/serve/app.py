"""The HTTP API and the web page of ``pvt serve``: FastAPI on uvicorn, one model, dynamic batches.

``POST /v1/predict`` answers what ``pvt predict`` prints for that task (the task's own
``Predictor`` builds it), plus ``latency_ms``; a segmentation also carries the ``label_png`` and
``overlay_png`` of ``pvt predict --out`` as ``data:`` URLs instead of file paths. Uploads are
read into memory with a size cap and decoded from there: nothing a request sends is written to disk.
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import File, create_form_parser
from torch import nn

from pvt.engine.config import Recipe
from pvt.engine.task import Predictor
from pvt.serve.batching import Batcher


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    max_upload_mb: float = 20.0


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


def create_app(predictor: Predictor, info: dict[str, Any], opts: ServeOptions) -> FastAPI:
    batcher: Batcher[torch.Tensor, Any] = Batcher(
        predictor.forward, max_batch=opts.max_batch, wait_s=opts.batch_wait_ms / 1000
    )
    limit = int(opts.max_upload_mb * 1024 * 1024)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="pvt serve", version="1", lifespan=lifespan)
    info = {
        **info,
        "max_batch": opts.max_batch,
        "batch_wait_ms": opts.batch_wait_ms,
        "max_upload_mb": opts.max_upload_mb,
    }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return (resources.files("pvt.serve") / "static" / "index.html").read_text(encoding="utf-8")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        return info

    @app.post("/v1/predict", openapi_extra=PREDICT_BODY)
    async def predict(request: Request) -> JSONResponse:
        """One image (multipart file part or raw body) -> the ``pvt predict`` record + ``latency_ms``."""
        start = time.perf_counter()
        name, data = image_part(request.headers.get("content-type", ""), await read_capped(request, limit))
        image = await run_in_threadpool(decode, data)
        x = await run_in_threadpool(predictor.prepare, image)
        try:
            output, batch = await batcher.submit(x)
        except ValueError as e:  # the model refuses this input (e.g. below its minimum size)
            raise HTTPException(422, f"cannot predict on this image: {e}") from e
        record = {"id": name, **await run_in_threadpool(predictor.record, name, output)}
        record.update(await run_in_threadpool(predictor.extras, x, output))  # e.g. a segmentation's pictures
        record["latency_ms"] = round(1000 * (time.perf_counter() - start), 2)
        return JSONResponse(record, headers={"X-Batch-Size": str(batch)})

    return app


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


def serve(task: str, recipe: Recipe, model: nn.Module, predictor: Predictor, opts: ServeOptions) -> None:
    """Bind, print ``serving on http://HOST:PORT`` (the real port when 0 was asked) and serve
    until interrupted."""
    import uvicorn

    app = create_app(predictor, model_info(task, recipe, model, predictor), opts)
    family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # Nagle's algorithm held each response's second write ~40 ms on keep-alive connections.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((opts.host, opts.port))
    sock.listen(128)  # connections made as soon as the port is printed wait in the backlog
    host = f"[{opts.host}]" if family == socket.AF_INET6 else opts.host
    print(f"serving on http://{host}:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
