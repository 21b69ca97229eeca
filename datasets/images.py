"""Opening any image a user may have as 8-bit RGB, upright: grayscale, palette, RGBA, 16-bit, EXIF-rotated.

``load_rgb`` is the one place images are read (training, prediction, report, benchmark, token maps). An image
past ``MAX_IMAGE_PIXELS`` is read reduced to within it (a JPEG is decoded at 1/2, 1/4 or 1/8 scale), without
PIL's DecompressionBombWarning; past twice PIL's limit, only a JPEG can be read.
"""
import logging
import os
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin
from torchvision.datasets.folder import IMG_EXTENSIONS

log = logging.getLogger(__name__)

# torchvision's list plus the other formats people keep photos in that Pillow reads natively
IMAGE_EXTENSIONS = tuple(IMG_EXTENSIONS) + ('.gif', '.jfif', '.jpe')
# pixel budget of a loaded image (PIL's warning threshold); larger images are read reduced to within it
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


def cannot_read(err: OSError, what: str) -> str:
    """The skip cause of an ``OSError`` met reading a ``what`` ('file', 'folder')."""
    if isinstance(err, PermissionError):
        return f'permission denied ({what} not readable)'
    return f'{what} not readable ({err.strerror or type(err).__name__})'


def reduction(size) -> int:
    """The smallest whole factor that brings an image of ``size`` within ``MAX_IMAGE_PIXELS`` (1: none)."""
    w, h = size
    factor = 1
    while -(-w // factor) * -(-h // factor) > MAX_IMAGE_PIXELS:
        factor += 1
    return factor


@contextmanager
def open_image(path) -> Iterator[Image.Image]:
    """``Image.open`` for images that ``load_rgb`` reduces: no DecompressionBombWarning while open, and a
    JPEG past twice PIL's limit opens too (it decodes at up to 1/8 scale); other formats past it still raise
    ``DecompressionBombError``."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError:
            with open(path, 'rb') as f:
                if f.read(3) != b'\xff\xd8\xff':  # not a JPEG
                    raise
            img = JpegImagePlugin.JpegImageFile(path)
        with img:
            yield img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: 16/32-bit grey is rescaled (not clipped), transparency is laid on white."""
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8)).convert('RGB')
    if img.mode == 'P' and 'transparency' in img.info or img.mode in ('RGBA', 'LA', 'PA'):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return img.convert('RGB')


def load_rgb(path) -> Image.Image:
    """Read ``path`` fully (so truncation shows here), turn it upright by its EXIF orientation, as RGB.

    An animated file (GIF, WebP) gives its first frame. An image past ``MAX_IMAGE_PIXELS`` comes reduced to
    within it, aspect kept: a JPEG decoded at 1/2, 1/4 or 1/8 scale, other formats shrunk after decoding.
    """
    with open_image(path) as img:
        factor = reduction(img.size)
        if factor > 1:  # libjpeg decodes at the smallest 1/2**k scale that fits (other formats ignore draft)
            scale = next((s for s in (2, 4, 8) if s >= factor), 8)
            img.draft('RGB', (max(1, img.width // scale), max(1, img.height // scale)))
        img.load()
        rgb = to_rgb(ImageOps.exif_transpose(img))
    factor = reduction(rgb.size)
    return rgb.reduce(factor) if factor > 1 else rgb


def load_problem(path, err: Exception) -> str:
    """Why ``load_rgb(path)`` raised ``err``, in words: ``check_image``'s cause, else the decoding error's."""
    return check_image(path) or f'cannot decode ({type(err).__name__})'


def try_load_rgb(path) -> Optional[Image.Image]:
    """``load_rgb``, or None with a warning naming the file and the cause when it fails to load."""
    try:
        return load_rgb(path)
    except Exception as err:  # truncated or corrupt data only shows when decoded; PIL raises many types
        log.warning('skipping %s: %s', path, load_problem(path, err))
        return None


def check_image(path) -> str:
    """Why ``path`` cannot be used as an image ('' when it looks fine); reads the header only."""
    try:
        if os.stat(path).st_size == 0:
            return 'empty file'
        with open_image(path) as img:
            img.verify()
    except PermissionError as err:
        return cannot_read(err, 'file')
    except Image.DecompressionBombError:
        return f"too large to decode (over {2 * Image.MAX_IMAGE_PIXELS} pixels, PIL's limit); downscale it"
    except Exception as err:  # PIL raises many types for a broken file
        return f'not a readable image ({type(err).__name__})'
    return ''
