"""EfficientTrain's curriculum (utils/curriculum.py): its schedule, its Fourier crop, the RandAugment magnitude in
persistent loader workers, refusals, and a resume inside a stage that continues the run exactly."""
import csv

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import train_gpu
import utils.trainer
from conftest import TINY_FLAGS, make_image_folder
from datasets.transforms import Augmentation
from models import build_model
from models.factory import load_for_inference
from utils.curriculum import EfficientTrain, ScheduledRandAugment, band_size, freq_crop, stage_of
from utils.curves import panels
from utils.errors import UserError

AUG = Augmentation((1.0, 1.0), (1.0, 1.0), 0.0, '', 0.0, 0.0, None)
CFG = dict(input_size=(3, 32, 32), interpolation='bilinear', mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)


def test_schedule_scales_the_official_one_to_any_size():
    assert [stage_of(e, 10) for e in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [stage_of(e, 4) for e in range(4)] == [1, 2, 3, 4]  # stage 0 ends at int(0.8) = 0, as the official's
    assert [band_size(k, 224, 16) for k in range(5)] == [160, 160, 160, 192, 224]
    assert [band_size(k, 128, 16) for k in range(5)] == [96, 96, 96, 112, 128]
    assert [band_size(k, 32, 16) for k in range(5)] == [16, 16, 16, 32, 32]


def test_freq_crop_keeps_the_low_frequencies():
    images = torch.randn(2, 3, 32, 32)
    out = freq_crop(images, 24)
    assert out.shape == (2, 3, 24, 24) and out.dtype == images.dtype
    assert torch.allclose(out.mean(dim=(-2, -1)), images.mean(dim=(-2, -1)), atol=1e-5)
    assert freq_crop(images, 32) is images
    smooth = torch.cos(torch.arange(32.) * 2 * torch.pi / 32).expand(1, 1, 32, 32)  # one low frequency
    assert torch.allclose(freq_crop(smooth, 16), smooth[..., ::2, ::2], atol=1e-5)  # resampled, same amplitude


class Magnitudes(Dataset):
    """Each item: the magnitude the scheduled RandAugment's ops have after transforming an image."""

    def __init__(self, transform):
        self.augment = next(t for t in transform.transforms if isinstance(t, ScheduledRandAugment))

    def __len__(self):
        return 4

    def __getitem__(self, i):
        self.augment(Image.new('RGB', (8, 8)))
        return torch.tensor([op.magnitude for op in self.augment.rand_augment.ops]).unique()


def test_the_stages_magnitude_reaches_persistent_workers():
    curriculum = EfficientTrain(10, 32, 8)
    loader = DataLoader(Magnitudes(curriculum.train_transform(CFG, AUG)), batch_size=2, num_workers=1,
                        persistent_workers=True)
    for epoch, expected in ((0, 1), (3, 3), (9, 9)):
        assert curriculum.set_epoch(epoch)['train_curriculum_magnitude'] == expected
        assert {m.item() for batch in loader for m in batch} == {expected}


def test_refusals():
    with pytest.raises(UserError, match='not a rand- policy'):
        EfficientTrain(10, 32, 8).train_transform(CFG, Augmentation(**{**vars(AUG), 'auto_augment': 'augmix-m5'}))
    model = build_model('vit_tiny_patch16_224', 'mtvit', dict(multi_scale=True), num_classes=3, img_size=64,
                        patch_size=8, depth=4, embed_dim=64, num_heads=2, dynamic_img_size=True)
    with pytest.raises(UserError, match="method 'mtvit' cannot run"):
        EfficientTrain(10, 64, 8).check_model(model, 'mtvit')


def test_with_toe_a_resume_inside_a_stage_continues_exactly(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / 'data', per_class=4)
    flags = ['--data-root', str(data), *TINY_FLAGS, '--batch-size', '8', '--img-size', '48', '--epochs', '7',
             '--curriculum', 'efficienttrain', '--method', 'toe', '--aa', 'rand-m9-mstd0.5-inc1']
    log_epoch = utils.trainer.log_epoch

    def stop_after(last):  # a run of 7 epochs interrupted after epoch ``last``
        def logged(epoch, *args):
            log_epoch(epoch, *args)
            if epoch == last:
                raise KeyboardInterrupt
        monkeypatch.setattr(utils.trainer, 'log_epoch', logged)

    stop_after(3)
    assert train_gpu.main([*flags, '--output-dir', str(tmp_path / 'whole')]) == 130
    stop_after(2)
    assert train_gpu.main([*flags, '--output-dir', str(tmp_path / 'parts')]) == 130
    stop_after(3)
    assert train_gpu.main(['--resume', str(tmp_path / 'parts' / 'last.pth')]) == 130  # epoch 3: inside stage 2
    whole, parts = ([{k: float(v) for k, v in row.items() if not k.endswith(('seconds', 'images_per_s'))}
                     for row in csv.DictReader((tmp_path / run / 'log.csv').open())] for run in ('whole', 'parts'))
    assert [(r['train_curriculum_stage'], r['train_curriculum_band'], r['train_curriculum_magnitude'])
            for r in whole] == [(0, 32, 1), (1, 32, 3), (2, 32, 5), (2, 32, 5)]
    assert parts == pytest.approx(whole, rel=1e-6)
    assert {'curriculum band', 'curriculum magnitude', 'keep rate'} <= {title for title, _ in panels(whole[0])}
    model, meta = load_for_inference(tmp_path / 'parts' / 'best.pth')  # the plain full-size model
    assert 'dynamic_img_size' not in meta['model_kwargs'] and model(torch.zeros(1, 3, 48, 48)).shape == (1, 3)
