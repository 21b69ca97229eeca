"""The reference a user compares train_gpu.py against: a plain timm training loop, nothing else.

    python tools/plain_loop.py --data-root data/real/photos --model deit_tiny_patch16_224 --img-size 64 \
        --epochs 8 --lr 1e-3

Resize + horizontal flip, AdamW (weight decay 0.05), OneCycle lr, label smoothing 0.1, top-1 on val/ after
every epoch. Prints each epoch's top-1 and training images/s (the training loop of the epoch, from its first
batch asked to its last step done; validation not counted), then the best and the last top-1. The data root
holds train/ and val/ class folders. ``--method`` trains this toolkit's variant of the same timm model (its
default settings) and ``--amp`` bf16 autocast on CUDA, so that tools/throughput_vs_plain.py can set both sides
to the same work.
"""
import argparse
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for --method's model factory


def build(args, num_classes: int) -> nn.Module:
    """timm's model, or with --method this toolkit's variant of it."""
    if args.method == 'none':
        return timm.create_model(args.model, img_size=args.img_size, num_classes=num_classes)
    from models.factory import build_model
    return build_model(args.model, args.method, {}, num_classes=num_classes, img_size=args.img_size)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data-root', required=True)
    p.add_argument('--model', default='deit_tiny_patch16_224')
    p.add_argument('--method', default='none', help="a token-reduction method of this toolkit, e.g. tome")
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--epochs', type=int, default=8)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--amp', action='store_true', help='bf16 autocast (on CUDA only)')
    p.add_argument('--pretrained', help='a timm state dict (.pth) to start from; its head is replaced')
    p.add_argument('--save', help='write the final weights here (a timm state dict)')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    norm = transforms.Normalize(timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)
    size = (args.img_size, args.img_size)
    train = datasets.ImageFolder(f'{args.data_root}/train', transforms.Compose(
        [transforms.Resize(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]))
    val = datasets.ImageFolder(f'{args.data_root}/val', transforms.Compose(
        [transforms.Resize(size), transforms.ToTensor(), norm]))
    loader = torch.utils.data.DataLoader(train, args.batch_size, shuffle=True, num_workers=args.workers,
                                         drop_last=True)
    val_loader = torch.utils.data.DataLoader(val, args.batch_size, num_workers=args.workers)
    model = build(args, len(train.classes))
    if args.pretrained:
        state = {k: v for k, v in torch.load(args.pretrained, map_location='cpu').items() if not k.startswith('head.')}
        print('missing:', model.load_state_dict(state, strict=False).missing_keys)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == 'cuda')
    accuracies = []
    for epoch in range(args.epochs):
        model.train()
        start = time.perf_counter()
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            optimizer.zero_grad()
            with amp:
                loss = loss_fn(model(images), targets)
            loss.backward()
            optimizer.step()
            schedule.step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        images_per_s = len(loader) * args.batch_size / (time.perf_counter() - start)
        model.eval()
        with torch.no_grad(), amp:
            hits = sum((model(x.to(device)).argmax(1) == y.to(device)).sum().item() for x, y in val_loader)
        accuracies.append(100 * hits / len(val))
        print(f'epoch {epoch}: top-1 {accuracies[-1]:.2f}%, train {images_per_s:.1f} images/s')
    print(f'best top-1 {max(accuracies):.2f}% (epoch {accuracies.index(max(accuracies))}), '
          f'last {accuracies[-1]:.2f}%')
    if args.save:
        torch.save(model.state_dict(), args.save)


if __name__ == '__main__':
    main()
