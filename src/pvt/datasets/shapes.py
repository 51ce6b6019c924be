"""Synthetic scenes: a deterministic COCO-format detection / instance / semantic segmentation set.

Shapes of several classes on textured backgrounds, a range of sizes, overlapping so that later
shapes occlude earlier ones, in two styles (``ShapesSpec.style``: "plain" and the harder "hard").
Written once to a cache folder in the standard COCO layout::

    ROOT/annotations/instances_{train,val}2017.json   boxes, RLE masks, areas
    ROOT/{train,val}2017/000000.png                    RGB images
    ROOT/semantic_{train,val}2017/000000.png           label maps (0 background, k = category k)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pvt.utils.cache import cache_dir

CLASSES = ("circle", "square", "triangle", "star")
VERSION = 4
# "plain": muted textures, saturated shapes, boxes of the visible part. "hard": busy saturated
# clutter, shapes often coloured and textured like what lies under them, boxes of occluded objects
# at their full extent (as COCO annotates them), masks of the visible part.
STYLES = ("plain", "hard")


@dataclass(frozen=True)
class ShapesSpec:
    """What to generate; the cache folder name encodes it, so a change regenerates."""

    image_size: int = 256
    train_images: int = 800
    val_images: int = 150
    min_objects: int = 1
    max_objects: int = 6
    min_size: int = 16  # object extent in pixels
    max_size: int = 100
    seed: int = 0
    style: str = "plain"

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"data.shapes.style={self.style!r}: expected one of {', '.join(STYLES)}")

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, object]) -> ShapesSpec:
        """The spec with a recipe's ``data.shapes`` overrides, each name and type checked."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in fields:
                raise ValueError(f"data.shapes.{key}: unknown setting; expected one of {', '.join(fields)}")
            want = str if key == "style" else int
            if not isinstance(value, want) or isinstance(value, bool):
                raise ValueError(f"data.shapes.{key}={value!r}: expected {'a name' if want is str else 'an integer'}")
            kwargs[key] = value
        return cls(**kwargs)

    def folder_name(self) -> str:
        style = "" if self.style == "plain" else f"-{self.style}"  # plain keeps its existing caches
        return (
            f"shapes-v{VERSION}{style}-{self.image_size}px-{self.train_images}+{self.val_images}"
            f"-{self.min_size}to{self.max_size}-s{self.seed}"
        )


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        n, radii = 4, [r]
    elif kind == "triangle":
        n, radii = 3, [r]
    else:  # star: alternate outer and inner radius
        n, radii = 10, [r, r * 0.45]
    return [
        (
            cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / n),
            cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / n),
        )
        for i in range(n)
    ]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour noise plus faint stripes: texture, so that detection is not thresholding."""
    coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    theta, freq = rng.uniform(0, math.pi), rng.uniform(0.05, 0.3)
    stripes = 14 * np.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)))[..., None]
    noise = rng.normal(0, 8, (size, size, 3))
    gray = base.mean(axis=2, keepdims=True)
    base = gray + 0.3 * (base - gray)  # muted colours: shapes stand out, textures remain
    return np.clip(base * 0.45 + 70 + stripes + noise, 0, 255).astype(np.uint8)


def _busy_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Saturated colour noise at three scales, coloured stripes and random strokes: clutter with
    the colours and edges of the shapes, so that neither colour nor edges alone find them.
    ``[size, size, 3]`` float in 0..255."""
    base = np.zeros((size, size, 3), np.float32)
    for cells, weight in ((4, 0.5), (16, 0.35), (48, 0.15)):
        coarse = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        up = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        base += weight * np.asarray(up, dtype=np.float32)
    gray = base.mean(axis=2, keepdims=True)
    base = gray + 2.2 * (base - gray)  # saturated, unlike the plain style's muted texture
    yy, xx = np.mgrid[0:size, 0:size]
    theta, freq = rng.uniform(0, math.pi), rng.uniform(0.1, 0.5)
    tint = rng.uniform(-1, 1, 3)
    base += 30 * np.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)))[..., None] * tint
    canvas = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 12))):  # strokes: straight edges and corners everywhere
        points = [tuple(float(v) for v in rng.uniform(-20, size + 20, 2)) for _ in range(int(rng.integers(2, 5)))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line(points, fill=colour, width=int(rng.integers(2, 7)))
    return np.asarray(canvas, dtype=np.float32) + rng.normal(0, 10, (size, size, 3))


def _hard_colour(rng: np.random.Generator, background: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A shape's fill ``[size, size, 3]``: for six shapes in ten, the mean colour of what it covers
    moved a little (camouflage); else a random saturated colour. Either way with mild noise of its
    own: a shape is a smoother region than the clutter, but neither its colour nor its edges alone
    set it apart."""
    if rng.uniform() < 0.6:
        colour = background[mask].mean(axis=0) + rng.normal(0, 40, 3)
    else:
        hsv = (int(rng.integers(256)), int(rng.integers(120, 256)), int(rng.integers(80, 256)))
        colour = np.asarray(Image.new("HSV", (1, 1), hsv).convert("RGB").getpixel((0, 0)), np.float32)
    return colour + rng.normal(0, 8, background.shape)


def render_scene(rng: np.random.Generator, spec: ShapesSpec) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image ``[H, W, 3]`` uint8 and its objects (class index, visible mask after occlusion,
    and for the hard style ``box``, the full extent ``[x0, y0, x1, y1]`` as COCO annotates it)."""
    size, hard = spec.image_size, spec.style == "hard"
    canvas = _busy_background(rng, size) if hard else _background(rng, size).astype(np.float32)
    objects: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        cls = int(rng.integers(len(CLASSES)))
        mask = _shape_mask(rng, spec, cls)
        if mask.sum() < 16:
            continue
        canvas[mask] = _hard_colour(rng, canvas, mask)[mask] if hard else _plain_colour(rng)
        for o in objects:  # the new shape hides what it covers (a hard-style box keeps the full extent)
            o["mask"] &= ~mask
        objects.append({"category": cls, "mask": mask, **({"box": _extent(mask)} if hard else {})})
    pixels = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    visible = [o for o in objects if o["mask"].sum() >= 16]
    return np.asarray(pixels), visible


def _plain_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour: plain-style shapes differ from the muted texture."""
    hsv = (int(rng.integers(256)), int(rng.integers(150, 256)), int(rng.integers(90, 256)))
    return np.asarray(Image.new("HSV", (1, 1), hsv).convert("RGB").getpixel((0, 0)), np.float32)


def _shape_mask(rng: np.random.Generator, spec: ShapesSpec, cls: int) -> np.ndarray:
    """The full (unoccluded) ``[size, size]`` bool mask of one shape of class ``cls``."""
    size = spec.image_size
    extent = float(np.exp(rng.uniform(math.log(spec.min_size), math.log(spec.max_size))))
    r = extent / 2
    cx, cy = rng.uniform(r * 0.5, size - r * 0.5, 2)
    mask_img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_img)
    if CLASSES[cls] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_polygon(CLASSES[cls], cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=255)
    return np.asarray(mask_img) > 127


def _extent(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _annotation(obj: dict[str, Any], ann_id: int, image_id: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    m = obj["mask"]
    x0, y0, x1, y1 = obj["box"] if "box" in obj else _extent(m)
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj["category"] + 1,
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        "area": float(m.sum()),
        "segmentation": rle,
        "iscrowd": 0,
    }


def _write_split(root: Path, split: str, count: int, spec: ShapesSpec, seed: int) -> None:
    rng = np.random.default_rng(seed)
    img_dir, sem_dir = root / f"{split}2017", root / f"semantic_{split}2017"
    img_dir.mkdir(parents=True)
    sem_dir.mkdir(parents=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(count):
        pixels, objects = render_scene(rng, spec)
        name = f"{i:06d}.png"
        Image.fromarray(pixels).save(img_dir / name)
        semantic = np.zeros(pixels.shape[:2], np.uint8)
        for o in objects:
            semantic[o["mask"]] = o["category"] + 1
        Image.fromarray(semantic).save(sem_dir / name)
        images.append({"id": i + 1, "file_name": name, "height": spec.image_size, "width": spec.image_size})
        first = len(annotations) + 1
        annotations += [_annotation(o, first + k, i + 1) for k, o in enumerate(objects)]
    coco = {
        "info": {"description": f"pvt-vision synthetic shapes v{VERSION}", "version": str(VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)],
    }
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))


def export_shapes(spec: ShapesSpec | None = None, root: Path | None = None) -> Path:
    """Generate the dataset once (atomically) and return its root; later calls reuse it."""
    spec = spec or ShapesSpec()
    if root is None:
        root = cache_dir() / spec.folder_name()
    if (root / "annotations" / "instances_val2017.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shapes-", dir=root.parent))
    try:
        _write_split(tmp, "train", spec.train_images, spec, spec.seed)
        _write_split(tmp, "val", spec.val_images, spec, spec.seed + 1_000_003)
        if not (root / "annotations" / "instances_val2017.json").is_file():
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
