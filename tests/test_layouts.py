"""Data layouts as users have them: split folder names, other layouts, toolkit outputs, symlinks, formats."""
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train_gpu
from conftest import TINY_FLAGS, make_image_folder
from datasets.folder import SafeImageDataset, labelled_root, make_split
from utils.errors import UserError

CLASSES = ['checker', 'stripes_h', 'stripes_v']


def split_root(root, names, per_class=2):
    for seed, name in enumerate(names):
        make_image_folder(root / name, per_class=per_class, size=16, seed=seed)
    return root


@pytest.mark.parametrize('names, used', [(('train', 'validation'), 'validation'), (('train', 'test'), 'test'),
                                         (('train', 'valid'), 'valid'), (('test', 'train', 'val'), 'val'),
                                         (('Training', 'Testing'), 'Testing'), (('Training', 'Test'), 'Test')])
def test_split_folder_names_give_the_validation_split(names, used, tmp_path, caplog):
    root = split_root(tmp_path / 'd', names)
    with caplog.at_level(logging.INFO):
        split = make_split(root)
    assert split.classes == CLASSES and len(split.train) == len(split.val) == 6
    assert {Path(p).parts[-3] for p, _ in split.val} == {used}
    assert f"'{used}/' for validation" in caplog.text
    assert ('ignoring test/' in caplog.text) == (used == 'val')
    assert labelled_root(root) == root / used  # predict.py scores the same split


def test_class_folders_named_like_splits_are_warned_about(tmp_path, caplog):
    """Intel's Kaggle layout, seg_train/seg_train/<class> + seg_test/seg_test/<class>, would train a model of
    "which split": a warning says so (classes may really be named so, so it is not refused)."""
    root = tmp_path / 'd'
    for seed, name in enumerate(('seg_train', 'seg_test')):
        make_image_folder(root / name / name, per_class=2, size=16, seed=seed)
    with caplog.at_level(logging.WARNING):
        split = make_split(root)
    assert split.classes == ['seg_test', 'seg_train']
    assert "seg_train/ and seg_test/ look like a train and a validation split" in caplog.text


@pytest.mark.parametrize('names, message', [(('train',), 'no validation folder'),
                                            (('train', 'holdout'), 'no validation folder'),
                                            (('val', 'test'), 'no train/'), (('Training',), 'no validation folder'),
                                            (('Test', 'holdout'), 'a split name is not a class')])
def test_split_names_that_do_not_pair_up_are_refused(names, message, tmp_path, capsys):
    root = split_root(tmp_path / 'd', names)
    assert train_gpu.main(['--data-root', str(root), '--output-dir', str(tmp_path / 'r'), *TINY_FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.count('error:') == 1 and message in err and '--train-dir' in err and 'Traceback' not in err


def test_train_dir_and_val_dir_for_any_other_layout(tmp_path):
    root = split_root(tmp_path / 'd', ('training', 'holdout'), per_class=4)
    run = tmp_path / 'run'
    assert train_gpu.main(['--data-root', str(root), '--train-dir', 'training', '--val-dir', 'holdout',
                           '--output-dir', str(run), '--epochs', '1', *TINY_FLAGS]) == 0
    assert (run / 'val_files.csv').read_text().count('/holdout/') == 12
    alone = make_split(train_dir=root / 'training', val_split=0.25)  # split by --val-split
    assert len(alone.train) == 9 and len(alone.val) == 3
    with pytest.raises(UserError, match='--val-dir needs --train-dir'):
        make_split(root, val_dir='holdout')


def test_a_class_of_one_image_is_named_when_the_split_needs_two(tmp_path):
    root = make_image_folder(tmp_path / 'd', per_class=3, size=16)
    for extra in sorted((root / 'stripes_v').iterdir())[1:]:
        extra.unlink()
    with pytest.raises(UserError, match="class folder.s. stripes_v hold a single image"):
        make_split(root)


@pytest.mark.parametrize('kind', ['empty', 'unreadable'])
def test_empty_or_unreadable_validation_split_is_refused(kind, tmp_path):
    root = split_root(tmp_path / 'd', ('train',))
    for name in CLASSES:
        (root / 'val' / name).mkdir(parents=True)
        if kind == 'unreadable':
            (root / 'val' / name / 'broken.png').write_bytes(b'not a png')
    with pytest.raises(UserError, match="val' holds no readable images"):
        make_split(root)


def test_toolkit_outputs_in_the_data_root_are_not_classes(tmp_path, caplog):
    root = make_image_folder(tmp_path / 'd', per_class=5, size=16)
    picture = (root / 'checker' / '000.png').read_bytes()
    outputs = {'runs/A': ('last.pth', 'log.csv', 'config.yaml'), 'predict-val-1': ('report.html', 'summary.json'),
               'checker/old-run': ('best.pth',)}  # also below a class folder
    for folder, names in outputs.items():
        (root / folder).mkdir(parents=True)
        for name in names + ('confusion_matrix.png',):
            (root / folder / name).write_bytes(picture if name.endswith('.png') else b'x')
    (root / 'runs' / 'A' / 'report').mkdir()
    (root / 'runs' / 'A' / 'report' / 'roc.png').write_bytes(picture)
    with caplog.at_level(logging.WARNING):
        split = make_split(root)
    assert split.classes == CLASSES and len(split.train) + len(split.val) == 15
    assert 'predict-val-1: a run folder or report of this toolkit' in caplog.text


def test_symlinked_class_folders_and_sub_folders_are_followed_once(tmp_path):
    root = make_image_folder(tmp_path / 'd', classes=('checker', 'stripes_h'), per_class=5, size=16)
    elsewhere = make_image_folder(tmp_path / 'elsewhere', classes=('stripes_v', 'dots'), per_class=5, size=16)
    os.symlink(elsewhere / 'stripes_v', root / 'stripes_v')              # a symlinked class folder
    os.symlink(elsewhere / 'dots', root / 'checker' / 'more')            # a symlinked sub-folder
    os.symlink(root / 'checker', root / 'checker' / 'loop')              # a loop
    split = make_split(root)
    counts = np.bincount([t for _, t in split.train + split.val])
    assert split.classes == CLASSES and counts.tolist() == [10, 5, 5]


def test_symlink_loops_and_broken_links_are_named_and_mac_zip_folders_are_no_class(tmp_path):
    root = make_image_folder(tmp_path / 'd', classes=('checker', 'stripes_h'), per_class=5, size=16)
    os.symlink(root, root / 'checker' / 'up')                           # would hold every class in checker
    os.symlink('/', root / 'stripes_h' / 'everything')
    os.symlink(tmp_path / 'gone.png', root / 'stripes_h' / 'moved.png')  # a link whose image was moved away
    make_image_folder(root / '__MACOSX', classes=('checker',), per_class=2, size=16)  # a zip made on a Mac
    split = make_split(root)
    counts = np.bincount([t for _, t in split.train + split.val])
    assert split.classes == ['checker', 'stripes_h'] and counts.tolist() == [5, 5]
    assert sorted(Path(p).name for p, why in split.skipped if 'a loop' in why) == ['everything', 'up']
    assert [Path(p).name for p, why in split.skipped if 'a broken symlink' in why] == ['moved.png']


def test_gif_and_exif_rotated_jpeg_load_upright(tmp_path):
    root = make_image_folder(tmp_path / 'd', classes=('checker', 'stripes_h'), per_class=5, size=16)
    phone = Image.new('RGB', (20, 10), 'blue')
    phone.paste((255, 0, 0), (0, 0, 10, 10))                            # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6                                                    # "rotate 90 clockwise to show"
    phone.save(root / 'checker' / 'phone.JPG', exif=exif, quality=95)
    Image.new('P', (12, 12), 3).save(root / 'stripes_h' / 'anim.gif')
    Image.new('RGB', (12, 12), 'green').save(root / 'stripes_h' / 'scan.tiff')
    split = make_split(root, 0.5)
    assert not split.skipped and len(split.train) + len(split.val) == 13
    samples = [(str(root / 'checker' / 'phone.JPG'), 0)]
    upright, _, _ = SafeImageDataset(samples)[0]                       # what training and prediction see
    pixels = np.asarray(upright)
    assert upright.size == (10, 20)                                     # portrait, as the phone showed it
    assert pixels[2, 5, 0] > 200 > pixels[17, 5, 0]                     # red on top, blue below
