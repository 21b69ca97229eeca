"""Hostile data: folders and files this user may not read, images past PIL's decompression-bomb limits."""
import ctypes
import logging
import os
import pickle
import warnings
from logging.handlers import BufferingHandler

import pytest
from PIL import Image
from torchvision import transforms

from conftest import make_image_folder
from datasets import images
from datasets.folder import SafeImageDataset, image_files, make_split, scan_classes
from datasets.images import check_image, try_load_rgb
from utils.errors import UserError

DENIED_FOLDER, DENIED_FILE = 'permission denied (folder not readable)', 'permission denied (file not readable)'


def drop_root_read_capabilities():
    """Make file modes bind this (root) process: clear CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH."""
    class Header(ctypes.Structure):
        _fields_ = [('version', ctypes.c_uint32), ('pid', ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [('effective', ctypes.c_uint32), ('permitted', ctypes.c_uint32), ('inheritable', ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), 'capget failed')
    data[0].effective &= ~0b110
    data[0].permitted &= ~0b110
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), 'capset failed')


def without_root_reads(fn):
    """(``fn()``, the warnings it logged) where file modes bind: as is for a normal user; for root, who reads
    every file whatever its mode, in a forked child that drops the capabilities to do so."""
    def call():
        handler = BufferingHandler(1000)
        logging.getLogger('datasets').addHandler(handler)
        try:
            return fn(), [r.getMessage() for r in handler.buffer]
        finally:
            logging.getLogger('datasets').removeHandler(handler)

    if os.geteuid() != 0:
        return call()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            os.close(read)
            try:
                drop_root_read_capabilities()
            except OSError as err:
                out = 'skip', str(err)
            else:
                try:
                    out = 'ok', call()
                except BaseException as err:  # sent as text: it need not pickle
                    out = 'error', RuntimeError(f'{type(err).__name__}: {err}')
            with os.fdopen(write, 'wb') as f:
                pickle.dump(out, f)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, 'rb') as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, out = pickle.loads(data)
    if kind == 'skip':
        pytest.skip(f'cannot drop root\'s file capabilities here ({out})')
    if kind == 'error':
        raise out
    return out


def test_unreadable_class_folder_sub_folder_and_file_are_skipped_with_the_cause(tmp_path):
    root = make_image_folder(tmp_path / 'd', per_class=3, size=8)
    make_image_folder(root / 'checker' / 'deep', classes=('dots',), size=8, per_class=2)  # a sub-folder
    make_image_folder(root / 'stripes_v' / 'listed', classes=('dots',), size=8, per_class=1)
    make_image_folder(root, classes=('dots',), size=8, per_class=2)  # a class folder
    denied = {root / 'dots': 0, root / 'checker' / 'deep': 0, root / 'stripes_h' / '000.png': 0,
              root / 'stripes_v' / 'listed' / 'dots': 0o444}  # listed, but its files cannot be reached
    for path, mode in denied.items():
        path.chmod(mode)

    def scan_all():
        refused = refused_images = None
        try:
            make_split(root)
        except UserError as err:
            refused = str(err)
        try:
            image_files([str(root / 'dots')])
        except UserError as err:
            refused_images = str(err)
        denied_file = SafeImageDataset([(str(root / 'stripes_h' / '000.png'), 2)])[0]  # a listing does not open it
        return scan_classes(root), refused, image_files([str(root)]), refused_images, denied_file

    try:
        (scan, refused, files, refused_images, denied_file), logged = without_root_reads(scan_all)
    finally:
        for path in denied:
            path.chmod(0o755)
    assert scan.classes == ['checker', 'dots', 'stripes_h', 'stripes_v']
    readable = [(str(root / c / f'{i:03d}.png'), t) for c, t, ids in
                (('checker', 0, range(3)), ('stripes_h', 2, (1, 2)), ('stripes_v', 3, range(3))) for i in ids]
    assert sorted(scan.samples) == sorted(readable + [(str(root / 'stripes_h' / '000.png'), 2)])
    assert sorted(scan.skipped) == [(str(root / 'checker' / 'deep'), DENIED_FOLDER),
                                    (str(root / 'dots'), DENIED_FOLDER),
                                    (str(root / 'stripes_v' / 'listed' / 'dots' / '000.png'), DENIED_FOLDER)]
    assert denied_file == (0, DENIED_FILE)  # skipped when loaded, with its cause
    assert all(f'skipping {path}: {why}' in logged for path, why in scan.skipped)  # a load failure: by its caller
    assert "class folder(s) dots in" in refused and 'hold no usable images' in refused
    assert 'no image files' in refused_images and '1 unreadable' in refused_images
    # --images lists the unreadable file too: predict.py skips it by check_image's cause
    assert files == sorted(p for p, _ in readable + [(str(root / 'stripes_h' / '000.png'), 2)])


def test_unreadable_data_root_is_one_line(tmp_path):
    root = make_image_folder(tmp_path / 'd', per_class=1, size=8)
    root.chmod(0)

    def refusal():
        try:
            make_split(root)
        except UserError as err:
            return str(err)

    try:
        refused, _ = without_root_reads(refusal)
    finally:
        root.chmod(0o755)
    assert refused == f"cannot list '{root}': {DENIED_FOLDER}; make it readable by this user"


def loads_quietly(path):
    """``load_rgb(path)`` through ``SafeImageDataset`` (what training and prediction do), failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        img, _, _ = SafeImageDataset([(str(path), 0)])[0]
    return img


def test_jpeg_past_pils_warning_threshold_is_decoded_reduced_without_warning(tmp_path):
    folder = tmp_path / 'd' / 'big'
    folder.mkdir(parents=True)
    path = folder / 'poster.jpg'
    Image.new('L', (10000, 9000), 90).save(path, quality=10)  # 90 M pixels: 0.15 s, 1 MB
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert check_image(path) == ''
        assert scan_classes(tmp_path / 'd').samples == [(str(path), 0)]
    img = loads_quietly(path)
    assert img.size == (5000, 4500) and img.mode == 'RGB'  # libjpeg's 1/2 scale: within the budget, aspect kept
    assert img.width * img.height <= images.MAX_IMAGE_PIXELS
    assert transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()])(img).shape == (3, 16, 16)


def test_images_past_the_budget_are_reduced_or_skipped_by_format(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 10_000)  # PIL warns past 10 000 pixels, refuses past 20 000
    monkeypatch.setattr(images, 'MAX_IMAGE_PIXELS', 10_000)
    folder = tmp_path / 'd' / 'big'
    folder.mkdir(parents=True)
    Image.new('L', (1000, 800), 50).save(folder / 'huge.jpg', quality=10)  # 80x PIL's limit: 1/8 scale, then 1/2
    Image.new('RGB', (200, 150), 'red').save(folder / 'past_limit.jpg')  # past 2x: libjpeg's 1/2 scale
    Image.new('P', (120, 100), 3).save(folder / 'over.png')  # 1.2x: shrunk after decoding
    Image.new('RGB', (200, 150), 'red').save(folder / 'past_limit.png')  # past 2x and no reduced decoding
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        scan = scan_classes(tmp_path / 'd')
    assert [os.path.basename(p) for p, _ in scan.samples] == ['huge.jpg', 'over.png', 'past_limit.jpg', 'past_limit.png']
    too_large = "too large to decode (over 20000 pixels, PIL's limit); downscale it"
    assert SafeImageDataset([(str(folder / 'past_limit.png'), 0)])[0] == (0, too_large)  # skipped when loaded
    for name, size in ('huge.jpg', (63, 50)), ('past_limit.jpg', (100, 75)), ('over.png', (60, 50)):
        assert loads_quietly(folder / name).size == size
    assert try_load_rgb(folder / 'past_limit.png') is None
