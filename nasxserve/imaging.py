"""Image decoding and conversion shared by training (image folders) and inference (torch-free).

One function turns whatever a user hands over into the pixels the model was trained on, so that a
prediction sees exactly what training saw:

- EXIF orientation is applied (phone photos are stored sideways);
- 16-bit greyscale is scaled to 8 bits (Pillow's own conversion would clip it to white);
- transparency is composited over a white background;
- palette, CMYK, greyscale and RGB are converted to the model's mode: ``L`` (1 channel, ITU-R 601
  luma) or ``RGB`` (3 channels, grey replicated);
- the image is resized to the model's input size with bilinear filtering (antialiased when
  shrinking), without keeping the aspect ratio, as the training data was.

Images that cannot be used raise :class:`ImageError`: not an image, truncated data, floating-point
pixels, fewer than ``MIN_SIDE`` pixels on a side, or more than ``MAX_PIXELS`` pixels.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nasxserve.errors import ImageError, ImageTooLarge

MAX_PIXELS = 64_000_000
# Formats Image.open may try. Each reads its size from a header before decoding pixels, so the pixel budget is
# checked first; a container such as ICO (which decodes an embedded PNG inside Image.open) is not among them.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
MIN_SIDE = 8
BACKGROUND = (255, 255, 255)
ORIENTATION = 0x0112                # the EXIF tag

ImageSource = Union[str, Path, bytes, bytearray, Image.Image, np.ndarray]


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def open_image(source: ImageSource, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``source`` fully (a path, encoded bytes, a PIL image or an (H, W[, C]) uint8 array).

    The size is checked from the header, before the pixels are decoded: more than ``max_pixels``
    raises :class:`ImageTooLarge`."""
    name = _describe(source)
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray):
        img = _from_array(source)
    else:
        if isinstance(source, (str, Path)) and not Path(source).is_file():
            raise ImageError(f"{name}: no such file")
        try:
            with warnings.catch_warnings():
                # Pillow's own guard stays on unless the caller allowed more pixels than it does: the size is
                # checked right below from the header, so a larger --max-pixels is not silently capped by it
                pillow = Image.MAX_IMAGE_PIXELS
                warnings.simplefilter("ignore" if pillow is not None and max_pixels > pillow else "error",
                                      Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                                 formats=FORMATS)
                _check_size(img, name, max_pixels)
                img.load()
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not an image Pillow can read in an accepted format "
                             f"({', '.join(FORMATS)})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
            raise ImageTooLarge(f"{name}: too many pixels to decode safely; downscale it below "
                                f"{limit / 1e6:g} megapixels (Pillow's own limit)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name}: the image data is damaged or truncated ({e})") from None
    _check_size(img, name, max_pixels)
    return img


def header_pixels(data: bytes) -> int | None:
    """width x height from the header of encoded image bytes in an accepted format, without decoding the
    pixels; None when there is no readable header (``open_image`` then says why)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            w, h = img.size
    except Exception:  # noqa: BLE001 - any header Pillow cannot read; open_image reports it properly
        return None
    return w * h


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise ImageError(f"arrays must be uint8 (H, W) or (H, W, C); got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return Image.fromarray(a, mode="L")
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return Image.fromarray(a, mode="RGB" if a.shape[2] == 3 else "RGBA")
    raise ImageError(f"arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {a.shape}")


def _check_size(img: Image.Image, name: str, max_pixels: int) -> None:
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLarge(f"{name}: {w}x{h} is {w * h / 1e6:.1f} megapixels; the limit is "
                            f"{max_pixels / 1e6:g}; downscale it first")
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"{name}: {w}x{h} pixels is too small to classify; at least {MIN_SIDE}x{MIN_SIDE} is needed")


def to_model_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert a decoded image to ``L`` (channels 1) or ``RGB`` (channels 3), as described above."""
    if channels not in (1, 3):
        raise ValueError(f"models take 1 or 3 channels, not {channels}")
    if img.getexif().get(ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)      # which copies even an image it leaves as it is
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        img = _eight_bit(img)
    elif img.mode == "F":
        raise ImageError("floating-point images are not supported: save the image with 8 or 16 bits per channel")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = _flatten_alpha(img)
    mode = "L" if channels == 1 else "RGB"
    return img if img.mode == mode else img.convert(mode)


_LUT_16 = np.round(np.arange(65536) * (255.0 / 65535)).astype(np.uint8)     # 16-bit value -> 8-bit, rounded


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) greyscale to 8 bits through a lookup table: no array wider than the image's own
    (an 8000x8000 16-bit PNG took 1.9 GB as int64 and float64 intermediates)."""
    a = np.asarray(img)
    lo, hi = int(a.min(initial=0)), int(a.max(initial=0))
    if lo < 0 or hi > 65535:
        raise ImageError(f"{img.mode} image values {lo}..{hi} are outside 0..65535")
    if img.mode == "I" and hi <= 255:
        return Image.fromarray(a.astype(np.uint8), mode="L")
    return Image.fromarray(_LUT_16[a], mode="L")


STRIP_ROWS = 256


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite over white, a strip of rows at a time: Pillow's compositing holds the GIL, and over a whole
    8000 x 8000 image it held it for 0.7 s (the server's event loop waited as long) and four full-size copies
    (1.45 GB). Compositing is per pixel, so the strips give the same pixels."""
    rgba = img if img.mode == "RGBA" else img.convert("RGBA")
    width, height = rgba.size
    out = Image.new("RGB", rgba.size)
    for top in range(0, height, STRIP_ROWS):
        strip = rgba.crop((0, top, width, min(height, top + STRIP_ROWS)))
        white = Image.new("RGBA", strip.size, BACKGROUND + (255,))
        out.paste(Image.alpha_composite(white, strip).convert("RGB"), (0, top))
    return out


def resize_to(img: Image.Image, width: int, height: int) -> Image.Image:
    """Bilinear resize to exactly ``width`` x ``height`` (the training data's rule)."""
    return img if img.size == (width, height) else img.resize((width, height), Image.Resampling.BILINEAR)


def to_uint8_chw(img: Image.Image) -> np.ndarray:
    """An ``L`` or ``RGB`` image as uint8 (C, H, W)."""
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def normalize(pixels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 (..., C, H, W) -> float32 ``(x / 255 - mean) / std`` with per-channel mean and std (C,)."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    shape = (-1, 1, 1)
    return (x - np.asarray(mean, np.float32).reshape(shape)) / np.asarray(std, np.float32).reshape(shape)
