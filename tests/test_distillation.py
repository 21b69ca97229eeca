"""--teacher: the loss against its formulas (and timm's LogitDistillationTask), a frozen teacher, one-line refusals."""
import argparse

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.task import DistillationTeacher, LogitDistillationTask

import train_gpu
from conftest import TINY, TINY_FLAGS, make_image_folder
from datasets.folder import Batch
from models.checkpoint import make_checkpoint
from models.factory import build_model
from utils.distillation import distillation_loss, load_teacher, make_distillation
from utils.engine import StepSettings, train_one_epoch
from utils.errors import UserError

CLASSES = ['checker', 'stripes_h', 'stripes_v']  # make_image_folder's
DATA_CONFIG = dict(input_size=(3, 32, 32), interpolation='bicubic', mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                   crop_pct=1.0)


def write_toolkit_checkpoint(path, classes=CLASSES, method='none', data_config=DATA_CONFIG):
    """A best.pth as train_gpu.py writes it, of a tiny untrained ViT."""
    model = build_model('vit_tiny_patch16_224', method, None, num_classes=len(classes), **TINY)
    meta = dict(model_name='vit_tiny_patch16_224', model_kwargs={k: v for k, v in TINY.items() if k != 'img_size'},
                method=method, method_cfg={}, num_classes=len(classes), class_names=list(classes),
                data_config=data_config)
    torch.save(make_checkpoint(meta, model.state_dict(), epoch=0), path)
    return path


def flags(teacher, weights=None, kind='soft', alpha=0.5, temperature=1.0):
    return argparse.Namespace(teacher=str(teacher), teacher_weights=weights and str(weights), distill_type=kind,
                              distill_alpha=alpha, distill_temperature=temperature, curriculum='none')


def test_soft_and_hard_losses_are_their_formulas():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    ce = F.cross_entropy(s, y)
    alpha, T = 0.3, 2.5
    p_t = (t / T).softmax(-1)
    kl = (p_t * (p_t.log() - (s / T).log_softmax(-1))).sum(-1).mean()  # KL(teacher || student), per image
    assert torch.allclose(distillation_loss(ce, s, t, 'soft', alpha, T), (1 - alpha) * ce + alpha * T * T * kl)
    hard = (1 - alpha) * ce + alpha * F.cross_entropy(s, t.argmax(-1))
    assert torch.allclose(distillation_loss(ce, s, t, 'hard', alpha, T), hard)
    # DeiT's soft loss divides the same sum by images x classes instead of images
    deit = F.kl_div((s / T).log_softmax(-1), (t / T).log_softmax(-1), reduction='sum', log_target=True)
    deit = deit * T * T / s.numel()
    assert torch.allclose(T * T * kl / s.shape[1], deit)


@pytest.mark.timm_floor  # timm.task's DistillationTeacher and LogitDistillationTask are in timm since 1.0.28
def test_soft_loss_equals_timms_logit_distillation_task():
    student = build_model('vit_tiny_patch16_224', num_classes=3, **TINY)
    teacher = DistillationTeacher(build_model('vit_tiny_patch16_224', num_classes=3, **TINY))
    task = LogitDistillationTask(student, teacher, criterion=torch.nn.CrossEntropyLoss(), task_loss_weight=0.3,
                                 temperature=2.0, verbose=False)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    out = task(x, y)
    with torch.no_grad():
        t = teacher(x)
    ours = distillation_loss(F.cross_entropy(out['output'], y), out['output'], t, 'soft', 0.7, 2.0)
    assert torch.allclose(ours, out['loss'])


def test_teacher_stays_in_eval_mode_without_gradients(tmp_path):
    ckpt = write_toolkit_checkpoint(tmp_path / 'best.pth')
    teacher = load_teacher(flags(ckpt), torch.device('cpu'))
    term = make_distillation(teacher, flags(ckpt), CLASSES, DATA_CONFIG, torch.device('cpu'))
    student = build_model('vit_tiny_patch16_224', 'tome', {'r': 2}, num_classes=3, **TINY)
    loader = [Batch(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), torch.arange(4), [])]
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    stats = train_one_epoch(student, loader, opt, torch.nn.CrossEntropyLoss(), StepSettings(torch.device('cpu'),
                            show_progress=False), 0, 1, loss_term=term)
    assert not teacher.module.training and not teacher.module.model.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.module.parameters())
    assert term.epoch_stats()['train_teacher_seconds'] > 0
    assert term.epoch_stats()['train_teacher_seconds'] == 0  # the next epoch's start from 0
    assert stats['num_updates'] == 1


@pytest.mark.timm_floor
def test_teacher_input_is_renormalised_to_its_own_mean_and_std(tmp_path):
    own = dict(DATA_CONFIG, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    ckpt = write_toolkit_checkpoint(tmp_path / 'best.pth', data_config=own)
    teacher = load_teacher(flags(ckpt), torch.device('cpu'))
    term = make_distillation(teacher, flags(ckpt), CLASSES, DATA_CONFIG, torch.device('cpu'))
    pixels = torch.rand(2, 3, 32, 32)
    student_batch = (pixels - 0.5) / 0.5
    expected = teacher.module.model((pixels - torch.tensor(own['mean']).view(1, 3, 1, 1))
                                    / torch.tensor(own['std']).view(1, 3, 1, 1))
    assert torch.allclose(term.teacher_logits(student_batch), expected, atol=1e-5)


@pytest.mark.timm_floor
def test_timm_model_teacher_with_a_weights_file(tmp_path):
    """A CNN teacher, as DeiT's: timm's test_resnet takes any image size; the file's head has the data's classes."""
    weights = tmp_path / 'resnet.pth'
    torch.save(timm.create_model('test_resnet', num_classes=3).state_dict(), weights)
    teacher = load_teacher(flags('test_resnet', weights, kind='hard'), torch.device('cpu'))
    term = make_distillation(teacher, flags('test_resnet', weights, kind='hard'), CLASSES, DATA_CONFIG,
                             torch.device('cpu'))
    logits = torch.randn(2, 3, requires_grad=True)
    term(torch.randn(2, 3, 32, 32), logits, logits.sum()).backward()
    assert logits.grad is not None


def _refused(argv, capsys, tmp_path, *expected):
    run = tmp_path / 'run'
    assert train_gpu.main([*argv, '--output-dir', str(run), '--epochs', '1', *TINY_FLAGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('error: ') and all(e in err[-1] for e in expected), err[-3:]
    assert not run.exists()  # refused before the run folder, or the folder it made is gone


def test_teacher_of_other_classes_is_one_line(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', per_class=4)
    ckpt = write_toolkit_checkpoint(tmp_path / 'best.pth', classes=['cat', 'dog', 'fox'])
    _refused(['--data-root', str(data), '--teacher', str(ckpt)], capsys, tmp_path, "'cat', 'dog', 'fox'", "'checker'")


@pytest.mark.parametrize('teacher, weights, expected', [
    ('notes.pth', None, 'is a text file, not a checkpoint'),
    ('missing/best.pth', None, 'does not exist'),
    ('no_such_model', None, 'neither a file nor a model timm knows'),
    ('hf-hub:nobody/nothing', None, 'does not load'),  # the hub is off in tests
    ('test_vit3', 'vit.pth', "cannot take this run's 32x32 images"),  # timm's test_vit3 is fixed at 160 px
    ('test_resnet', 'vit.pth', 'holds no classifier fc.weight'),
])
def test_teacher_that_cannot_serve_is_one_line(teacher, weights, expected, tmp_path, capsys):
    (tmp_path / 'notes.pth').write_text('not a checkpoint\n')
    torch.save(timm.create_model('test_vit3', num_classes=3).state_dict(), tmp_path / 'vit.pth')
    data = make_image_folder(tmp_path / 'data', per_class=4)
    path = tmp_path / teacher if teacher.endswith('.pth') else teacher
    extra = ['--teacher-weights', str(tmp_path / weights)] if weights else []
    _refused(['--data-root', str(data), '--teacher', str(path), *extra], capsys, tmp_path, expected)


def test_a_teacher_under_a_curriculum_is_refused(tmp_path):
    args = flags(tmp_path / 'best.pth')
    args.curriculum = 'efficienttrain'
    with pytest.raises(UserError, match='--teacher with --curriculum efficienttrain is not supported'):
        load_teacher(args, torch.device('cpu'))
