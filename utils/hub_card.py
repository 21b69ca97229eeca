"""The model card (README.md) of a hub export: what the model is, what its run measured, how to load and predict.

The text is timm's own ``generate_readme`` (front matter, details, usage), fed from the checkpoint: the run's
validation top-1 and macro F1 at the saved epoch (what the checkpoint records of its run) and the MAC ratio the
export counted. A plain-backbone export (dense, ToMe, GTP, ToE) loads with ``timm.create_model('hf-hub:...')`` as
the dense model, and this toolkit switches its token reduction on (``apply_method``); an export whose method adds
parameters (MTViT, DGE) loads with this toolkit only, from its checkpoint file.
"""
from dataclasses import dataclass
from typing import Optional

from timm.models._hub import generate_readme

PLACEHOLDER = 'ORG/NAME'
TOOLKIT = 'the Efficient ViT fine-tuning toolkit'  # README.md's title


@dataclass
class CardFacts:
    """What the card states, gathered by the exporter."""
    repo_id: Optional[str]   # the hub repository, if known (--push-to-hub)
    name: str                # the model's name: the repository's, else the folder's
    meta: dict               # the checkpoint as train_gpu.py wrote it (its metadata, epoch and val record)
    method: str              # the method and settings of the exported model
    method_cfg: dict
    plain: bool              # the weights load into the stock timm model
    checkpoint_file: str     # the toolkit checkpoint in the folder (methods with parameters of their own)
    gmacs: float             # per image, with the method, and of the same backbone dense
    dense_gmacs: float
    mac_images: int
    params_m: float


def _metrics(meta: dict) -> str:
    val = meta.get('val') or {}
    if 'top1' not in val:
        return 'not recorded in the checkpoint'
    trained = 'no token reduction' if meta['method'] == 'none' else f"{meta['method']} {meta['method_cfg']}"
    return (f"top-1 {val['top1']:.2f} %, macro F1 {val['macro_f1']:.2f} % on {val.get('val_images', '?')} validation "
            f"images at epoch {meta.get('epoch')}, with {trained} (the run's own validation split)")


def _usage(facts: CardFacts, repo: str) -> str:
    meta, method, cfg = facts.meta, facts.method, facts.method_cfg
    if not facts.plain:
        return (f"These weights hold parameters that {method} adds to the ViT, so `timm.create_model('hf-hub:...')` "
                f"does not build them; load them with {TOOLKIT}'s predict.py:\n\n"
                f"```\nhf download {repo} {facts.checkpoint_file} --local-dir model\n"
                f"python predict.py --weights model/{facts.checkpoint_file} --images photo.jpg --topk 3\n"
                f"python predict.py --weights model/{facts.checkpoint_file} --data-root labelled_folder/   # report\n"
                f"```\n\nThe checkpoint holds the model, the method and its settings ({method} {cfg}), the class "
                f"names and the input description; `--pretrained model/{facts.checkpoint_file}` in train_gpu.py "
                f"fine-tunes from it.\n")
    reduce = ('' if method == 'none' else
              f"\nThe weights are a plain timm ViT: timm alone runs them dense (no token reduction). {TOOLKIT[0].upper()}"
              f"{TOOLKIT[1:]} switches {method} on at load, on the same weights (its validation figures above are "
              f"with {method}):\n\n```python\nimport timm\n"
              f"from models.registry import apply_method  # from this toolkit's repository root\n"
              f"model = apply_method(timm.create_model('hf-hub:{repo}', pretrained=True), '{method}', {cfg!r}).eval()\n"
              f"```\n")
    kwargs = ' '.join(f'{k}={v}' for k, v in meta['model_kwargs'].items())
    return (f"```python\nimport timm, torch\nfrom PIL import Image\n\n"
            f"model = timm.create_model('hf-hub:{repo}', pretrained=True).eval()\n"
            f"transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))\n"
            f"labels = model.pretrained_cfg['label_names']\n"
            f"with torch.no_grad():\n"
            f"    probs = model(transform(Image.open('photo.jpg').convert('RGB'))[None]).softmax(-1)[0]\n"
            f"for p, i in zip(*probs.topk(min(3, len(labels)))):\n"
            f"    print(labels[i], f'{{p:.3f}}')\n```\n{reduce}"
            f"\nFine-tune it on your own classes with {TOOLKIT}: `python train_gpu.py --data-root DIR --model "
            f"{meta['model_name']}{' --model-kwargs ' + kwargs if kwargs else ''} --pretrained hf-hub:{repo} "
            f"--method {method}` (a new classifier head, as timm does for new classes).\n")


def model_card(facts: CardFacts) -> str:
    """README.md of the export, in timm's model-card layout."""
    meta = facts.meta
    repo = facts.repo_id or PLACEHOLDER
    classes = meta['class_names']
    size = meta['data_config']['input_size']
    method = 'none (dense)' if facts.method == 'none' else f'{facts.method} {facts.method_cfg}'
    details = {
        'Model type': 'image classification',
        'Architecture': f"timm {meta['model_name']} {meta['model_kwargs'] or ''}".strip(),
        'Token reduction': method,
        'Classes': f"{len(classes)}: {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''}",
        'Input': f"{size[-2]} x {size[-1]} px, mean {list(meta['data_config']['mean'])}, "
                 f"std {list(meta['data_config']['std'])}",
        'Params (M)': f'{facts.params_m:.2f}',
        'GMACs': f"{facts.gmacs:.3f} per image ({facts.dense_gmacs:.3f} dense), MAC ratio "
                 f"{facts.gmacs / facts.dense_gmacs:.2f} (torchprofile, mean of {facts.mac_images} images)",
        'Validation': _metrics(meta),
    }
    tags = ['image-classification', 'vision-transformer', 'token-reduction'] + (['timm'] if facts.plain else [])
    card = dict(tags=tags, library_name='timm' if facts.plain else 'pytorch', license='other', details=details,
                description=f"A {meta['model_name']} fine-tuned with {TOOLKIT}"
                            f"{'' if facts.method == 'none' else ', with token reduction ' + facts.method}."
                            + ('' if facts.repo_id else f" Replace {PLACEHOLDER} below with the repository this "
                                                          f"folder is uploaded to."),
                usage=_usage(facts, repo))
    return generate_readme(card, facts.name)
