"""The reference a user compares train_gpu.py against: a plain timm training loop, nothing else.

    python tools/plain_loop.py --data-root data/real/photos --model deit_tiny_patch16_224 --img-size 64 \
        --epochs 8 --lr 1e-3

Resize + horizontal flip, AdamW (weight decay 0.05), OneCycle lr, label smoothing 0.1, top-1 on val/ after
every epoch. Prints the best and the last top-1. The data root holds train/ and val/ class folders.
"""
import argparse

import timm
import torch
from torch import nn
from torchvision import datasets, transforms


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data-root', required=True)
    p.add_argument('--model', default='deit_tiny_patch16_224')
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--epochs', type=int, default=8)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--pretrained', help='a timm state dict (.pth) to start from; its head is replaced')
    p.add_argument('--save', help='write the final weights here (a timm state dict)')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    norm = transforms.Normalize(timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)
    size = (args.img_size, args.img_size)
    train = datasets.ImageFolder(f'{args.data_root}/train', transforms.Compose(
        [transforms.Resize(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]))
    val = datasets.ImageFolder(f'{args.data_root}/val', transforms.Compose(
        [transforms.Resize(size), transforms.ToTensor(), norm]))
    loader = torch.utils.data.DataLoader(train, args.batch_size, shuffle=True, num_workers=2, drop_last=True)
    val_loader = torch.utils.data.DataLoader(val, args.batch_size, num_workers=2)
    model = timm.create_model(args.model, img_size=args.img_size, num_classes=len(train.classes))
    if args.pretrained:
        state = {k: v for k, v in torch.load(args.pretrained, map_location='cpu').items() if not k.startswith('head.')}
        print('missing:', model.load_state_dict(state, strict=False).missing_keys)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    accuracies = []
    for epoch in range(args.epochs):
        model.train()
        for images, targets in loader:
            optimizer.zero_grad()
            loss_fn(model(images), targets).backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            hits = sum((model(x).argmax(1) == y).sum().item() for x, y in val_loader)
        accuracies.append(100 * hits / len(val))
        print(f'epoch {epoch}: top-1 {accuracies[-1]:.2f}%')
    print(f'best top-1 {max(accuracies):.2f}% (epoch {accuracies.index(max(accuracies))}), '
          f'last {accuracies[-1]:.2f}%')
    if args.save:
        torch.save(model.state_dict(), args.save)


if __name__ == '__main__':
    main()
