"""Images read as a person sees them: EXIF orientation applied; grayscale, palette, alpha, CMYK and
16-bit images converted to 8-bit RGB; errors that name the image."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An image that cannot be read; the message names it and why."""


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` upright (its EXIF orientation applied) as 8-bit RGB; transparency over white."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit grey: scale, not clip
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(a * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes, name: str) -> Image.Image:
    """The image in ``data`` (any format PIL reads) as upright 8-bit RGB, fully decoded; an
    ``ImageError`` naming ``name`` when it is empty, not an image, truncated, corrupt or a
    decompression bomb."""
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS:
                # PIL itself refuses only beyond twice its limit (and warns below that).
                raise Image.DecompressionBombError(f"{w}x{h} = {w * h} pixels")
            im.load()
            return to_rgb(im)
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not an image PIL can read (JPEG, PNG, WebP, BMP, TIFF, GIF, ...)") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: decompression bomb refused ({e})") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"{name}: truncated or corrupt image ({e})") from e
