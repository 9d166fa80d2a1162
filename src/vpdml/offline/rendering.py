"""Turning icon and emoji artwork into square RGB images: SVG rasterising, compositing on white, PNG bytes."""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING

from PIL import Image

from vpdml.offline.npm import OfflineDatasetError

if TYPE_CHECKING:
    pass


def composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten any PIL image (RGBA, LA, palette with transparency, ...) onto white, as RGB.

    Emoji have transparent backgrounds; a model sees black where alpha is dropped naively, which would
    make the background a style cue (PNG vs SVG sources differ in how they store it).
    """
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_square_rgb(image: Image.Image, image_size: int) -> Image.Image:
    """Composite on white and resize (Lanczos) to ``image_size`` x ``image_size`` when needed."""
    flattened = composite_on_white(image)
    if flattened.size != (image_size, image_size):
        flattened = flattened.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return flattened


def rasterise_svg(svg: bytes, image_size: int) -> Image.Image:
    """Render an SVG at ``image_size`` x ``image_size`` with cairosvg, composited on white."""
    try:
        import cairosvg
    except ImportError as error:  # cairosvg needs the system cairo library too
        raise OfflineDatasetError(
            "Rasterising OpenMoji's SVGs needs cairosvg (and the cairo library): pip install 'vpdml[offline]'"
        ) from error
    png = cairosvg.svg2png(bytestring=svg, output_width=image_size, output_height=image_size)
    return composite_on_white(Image.open(io.BytesIO(png)))


def png_bytes(image: Image.Image) -> bytes:
    """Encode as PNG (lossless; emoji compress to ~1 KB at 64 px)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one), for sizing worker pools."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
