"""Folder and file names as users have them ('$', 'NA', 'None', formula characters, non-UTF-8 bytes) train
and report end to end."""
import json
import os

import numpy as np

import pandas as pd

import predict
import train_gpu
from conftest import TINY_FLAGS
from datasets.demo import draw_texture
from utils.report import read_report_csv

NAMES = ['$x$', '+plus', '-minus', '=SUM(A1)', '@at', 'NA', 'None']
TEXTURES = ['checker', 'dots', 'stripes_h', 'stripes_v']


def test_odd_names_train_and_report(tmp_path, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / 'data'
    for i, name in enumerate(NAMES):
        for split, count in (('train', 3), ('val', 1)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for j in range(count):
                draw_texture(TEXTURES[i % 4], rng, 32).save(root / split / name / f'{j}.png')
    bad_name = os.path.join(os.fsencode(root / 'val' / 'NA'), b'caf\xe9.png')  # Latin-1 bytes, not UTF-8
    with open(bad_name, 'wb') as f:
        draw_texture('dots', rng, 32).save(f, format='PNG')
    with open(os.path.join(os.fsencode(root / 'val' / 'NA'), b'broken\xff.png'), 'wb') as f:
        f.write(b'not a png')  # skipped, and listed as such
    run = tmp_path / 'run'
    flags = [f for f in TINY_FLAGS if f != '--no-report']
    assert train_gpu.main(['--data-root', str(root), '--output-dir', str(run), '--epochs', '1', *flags]) == 0
    out = tmp_path / 'predict'
    assert predict.main(['--weights', str(run / 'best.pth'), '--data-root', str(root), '--output-dir', str(out),
                         '--workers', '0', '--token-maps', '--n-visualization', '8']) == 0
    assert 'NA ' in capsys.readouterr().out  # the per-class table printed from the CSV read back
    for report in (run / 'report', out):
        summary = json.loads((report / 'summary.json').read_text())
        assert summary['classes'] == sorted(NAMES) and summary['images'] == 8
        table = read_report_csv(report / 'per_class_report.csv')
        assert set(NAMES) <= set(table.index)
        raw = (report / 'predictions.csv').read_bytes()
        assert b'caf\xe9.png' in raw                                   # the file name, byte for byte
        assert b"'=SUM(A1)" in raw and b",=SUM" not in raw and b",@at" not in raw and b",-minus" not in raw
        rows = pd.read_csv(report / 'predictions.csv', keep_default_na=False, encoding_errors='surrogateescape',
                       dtype={'file': object})
        assert sorted(set(rows['true'])) == sorted(["'+plus", "'-minus", "'=SUM(A1)", "'@at", '$x$', 'NA', 'None'])
        page = (report / 'report.html').read_bytes().decode('utf-8')  # valid UTF-8 whatever the names
        assert '=SUM(A1)' in page and 'broken\\udcff.png' in page and summary['skipped_files'] == 1
    assert (out / 'token_maps.png').is_file()
    assert (run / 'val_files.csv').read_bytes().count(b'caf\xe9.png') == 1
    assert b'broken\xff.png' in (run / 'skipped_files.csv').read_bytes()
