"""Opening any image a user may have as 8-bit RGB, upright: grayscale, palette, RGBA, 16-bit, EXIF-rotated.

``load_rgb`` is the one place images are read (training, prediction, report, benchmark, token maps).
"""
import logging
from typing import Optional

import numpy as np
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS

log = logging.getLogger(__name__)

# torchvision's list plus the other formats people keep photos in that Pillow reads natively
IMAGE_EXTENSIONS = tuple(IMG_EXTENSIONS) + ('.gif', '.jfif', '.jpe')


def cannot_read(err: OSError, what: str) -> str:
    """The skip cause of an ``OSError`` met reading a ``what`` ('file', 'folder')."""
    if isinstance(err, PermissionError):
        return f'permission denied ({what} not readable)'
    return f'{what} not readable ({err.strerror or type(err).__name__})'


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

    An animated file (GIF, WebP) gives its first frame.
    """
    with Image.open(path) as img:
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))


def try_load_rgb(path) -> Optional[Image.Image]:
    """``load_rgb``, or None with a warning naming the file when it fails to decode (truncated, corrupt)."""
    try:
        return load_rgb(path)
    except Exception as err:  # truncated or corrupt data only shows when decoded; PIL raises many types
        log.warning('skipping %s: cannot decode (%s)', path, type(err).__name__)
        return None


def check_image(path) -> str:
    """Why ``path`` cannot be used as an image ('' when it looks fine); reads the header only."""
    try:
        if path.stat().st_size == 0:
            return 'empty file'
        with Image.open(path) as img:
            img.verify()
    except PermissionError as err:
        return cannot_read(err, 'file')
    except Exception as err:  # PIL raises many types for a broken file
        return f'not a readable image ({type(err).__name__})'
    return ''
