# Inline image previews drawn with Unicode half blocks.
#
# Invariants:
# * ``render_preview`` is blocking (Pillow decodes) and must run off the UI
#   thread (the screen calls it through ``asyncio.to_thread`` in a worker).
# * Untrusted input: the encoded size is bounded by the caller, the decoded size
#   here (``MAX_PIXELS``, checked from the header before any pixel is decoded),
#   so a decompression bomb is refused instead of filling memory. Any decoding
#   failure becomes ``PreviewError``, shown as a placeholder.
# * Half blocks ("▀": foreground = upper pixel, background = lower pixel) work in
#   every terminal with colour; Rich lowers the true colours to what the terminal
#   supports. Kitty graphics / sixel are not used: Textual's compositor repaints
#   cells, and escape-sequence images do not survive scrolling in an OptionList.
"""Half-block rendering of images for the conversation."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError
from rich.style import Style
from rich.text import Text

__all__ = ["MAX_BYTES", "MAX_PIXELS", "PreviewError", "is_previewable", "render_preview"]

#: Largest encoded image fetched for a preview.
MAX_BYTES = 8 * 1024 * 1024
#: Largest decoded image (width x height) accepted for a preview.
MAX_PIXELS = 24_000_000

_PREVIEWABLE = frozenset(
    {"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/x-ms-bmp"}
)


class PreviewError(Exception):
    """The image cannot be shown (corrupt, unsupported or too large)."""


def is_previewable(mime_type: str, size: int) -> bool:
    """True if an attachment of this type and size gets an inline preview."""
    return mime_type.lower() in _PREVIEWABLE and 0 < size <= MAX_BYTES


def render_preview(data: bytes, max_cols: int, max_rows: int) -> Text:
    """Decode ``data`` and draw it in at most ``max_cols`` x ``max_rows`` cells.

    Raises:
        PreviewError: not an image Pillow can decode, corrupt, or more than
            ``MAX_PIXELS`` pixels.
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns (and only errors past 2x its own limit); ours is stricter.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if width <= 0 or height <= 0 or width * height > MAX_PIXELS:
                    raise PreviewError(f"image of {width}x{height} pixels is too large")
                # JPEG can decode at 1/2..1/8 scale directly: far less work and memory.
                im.draft("RGB", (max_cols, max_rows * 2))
                im.thumbnail((max_cols, max_rows * 2))
                small = im.convert("RGBA")
    except PreviewError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # UnidentifiedImageError is an OSError; truncated data raises OSError,
        # bad headers ValueError/SyntaxError depending on the plugin.
        kind = "not an image" if isinstance(exc, UnidentifiedImageError) else "corrupt image"
        raise PreviewError(kind) from exc
    return _half_blocks(small)


def _half_blocks(im: Image.Image) -> Text:
    width, height = im.size
    pixels = im.load()
    assert pixels is not None
    text = Text(no_wrap=True, overflow="crop")
    for y in range(0, height, 2):
        if y:
            text.append("\n")
        for x in range(width):
            top = _colour(pixels[x, y])
            bottom = _colour(pixels[x, y + 1]) if y + 1 < height else None
            if top is None and bottom is None:
                text.append(" ")
            elif top is None:
                text.append("▄", Style(color=bottom))
            else:
                text.append("▀", Style(color=top, bgcolor=bottom))
    return text


def _colour(pixel: object) -> str | None:
    """``#rrggbb``, or None for a (mostly) transparent pixel (the background shows)."""
    assert isinstance(pixel, tuple)
    r, g, b, a = pixel
    if a < 128:
        return None
    return f"#{r:02x}{g:02x}{b:02x}"
