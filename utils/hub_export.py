"""Export a toolkit checkpoint as a Hugging Face hub model folder, check that it loads back, and push it if asked.

A method that only changes how the blocks handle tokens (dense, ToMe, GTP, ToE) leaves the weights of a plain timm
ViT: they are written by timm's ``save_for_hf`` (model.safetensors and a config.json whose ``label_names`` are the
classes and whose ``pretrained_cfg`` holds the input description), so ``timm.create_model('hf-hub:ORG/NAME',
pretrained=True)`` builds the model and the toolkit switches the reduction back on (the card says how). A method
that adds parameters (MTViT's fusion, DGE's routers) cannot load into the stock model: its folder holds the toolkit
checkpoint (``checkpoint.pth``, weights and metadata only) with the same config.json, and the card says to load it
with predict.py. Either way the folder is written beside its destination, loaded back (timm's ``local-dir:``, or
the toolkit's reader) and compared with the checkpoint's model before it takes its name, so a failed export leaves
nothing behind. ``--push-to-hub`` uploads that checked folder as it is (huggingface_hub's ``upload_folder``, what
timm's ``push_to_hf_hub`` does after writing its own copy).
"""
from pathlib import Path
from typing import Optional, Sequence

import timm
import torch
from timm.models import save_for_hf
from timm.models._hub import save_config_for_hf

from models.checkpoint import load_toolkit_checkpoint, make_checkpoint, save_atomic
from models.factory import load_for_inference, model_from_checkpoint
from models.registry import apply_method, method_cfg, method_name
from utils.atomic_write import replaced_folder
from utils.errors import UserError
from utils.export import TOLERANCE, compare, input_batch
from utils.hub_card import CardFacts, model_card
from utils.profiling import count_macs

CHECKPOINT_FILE = 'checkpoint.pth'
MAC_IMAGES = 2  # images the method's MACs are averaged over (DGE's depend on the image; dense ones do not)


def describe_input(model, meta: dict) -> None:
    """Make the model's pretrained_cfg describe this checkpoint's input and classes, which timm writes to
    config.json and reads back (the architecture's default tag, its license and test-time size are not these
    weights')."""
    cfg = {k: v for k, v in model.pretrained_cfg.items() if not k.startswith('test_') and k not in ('tag', 'license')}
    data = meta['data_config']
    cfg.update(input_size=tuple(data['input_size']), interpolation=data['interpolation'], mean=tuple(data['mean']),
               std=tuple(data['std']), crop_pct=data['crop_pct'], num_classes=meta['num_classes'])
    model.pretrained_cfg = cfg


def write_folder(folder: Path, ckpt: dict, model, dense, plain: bool) -> None:
    """config.json (timm's, with the classes and the method), and the weights: model.safetensors through timm's
    ``save_for_hf`` (plain), or the toolkit checkpoint (a method with parameters of its own)."""
    describe_input(dense, ckpt)
    config = dict(label_names=list(ckpt['class_names']),
                  toolkit=dict(method=method_name(model), method_cfg=method_cfg(model)))
    args = {**ckpt['model_kwargs'], 'img_size': ckpt['data_config']['input_size'][-1]}
    if plain:
        save_for_hf(dense, str(folder), model_config=config, model_args=args, safe_serialization=True)
        return
    save_config_for_hf(dense, folder / 'config.json', model_config=config, model_args=args)
    meta = {**ckpt, **config['toolkit']}
    save_atomic(make_checkpoint(meta, model.state_dict(), epoch=ckpt.get('epoch')), folder / CHECKPOINT_FILE)


def reload(folder: Path, plain: bool, method: str, cfg: dict):
    """The model as a user gets it back from the folder, as the card says: through timm with the reduction
    switched on by ``apply_method``, or through the toolkit's checkpoint reader."""
    if plain:
        return apply_method(timm.create_model(f'local-dir:{folder.resolve()}', pretrained=True), method, cfg).eval()
    return load_for_inference(folder / CHECKPOINT_FILE)[0]


def push(folder: Path, repo_id: str) -> str:
    """Upload ``folder`` to the hub repository ``repo_id`` (created if new); its URL, or one line on why not."""
    from huggingface_hub import HfApi
    try:
        api = HfApi()
        repo = api.create_repo(repo_id, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message='Add model (vit-token-reduction)')
    except Exception as err:  # the hub's HTTP, offline and no-token errors, and the HTTP client's own (httpx)
        why = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"could not push to the Hugging Face hub repository '{repo_id}' ({type(err).__name__}: {why}); "
                        f"the folder '{folder}' is written and checked: log in with `hf auth login` and upload it "
                        f"with `hf upload {repo_id} {folder}`") from None
    return f'https://huggingface.co/{repo}'


def check_repo_id(repo_id: str) -> None:
    """Refuse a malformed --push-to-hub name before anything is written."""
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(repo_id)
    except ValueError as err:  # HFValidationError
        raise UserError(f"--push-to-hub '{repo_id}' is not a hub repository name ({str(err).splitlines()[0][:150]}); "
                        f"write it as ORG/NAME") from None


def output_folder(output: Optional[str], weights: str) -> Path:
    """Where the folder goes (default: beside the checkpoint, named after it); never over existing files."""
    folder = Path(output) if output else Path(weights).with_name(Path(weights).stem + '-hub')
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--output '{folder}' exists and is not an empty folder; choose a new --output "
                        f"(nothing there is overwritten)")
    return folder


def export_hub(weights: str, output: Optional[str] = None, method: Optional[str] = None,
               cfg: Optional[dict] = None, check_files: Sequence[str] = (), check_count: int = 8,
               push_to: Optional[str] = None) -> dict:
    """Write the hub folder of ``weights`` (its method optionally overridden), check it, push it if ``push_to``;
    returns what was done and measured."""
    folder = output_folder(output, weights)
    if push_to:
        check_repo_id(push_to)
    ckpt = load_toolkit_checkpoint(weights)
    model = model_from_checkpoint(ckpt, weights, method, cfg).eval()
    dense = model_from_checkpoint(ckpt, weights, 'none').eval()
    plain = set(model.state_dict()) == set(dense.state_dict())
    images = input_batch(check_files, ckpt['data_config'], check_count)
    method, cfg = method_name(model), method_cfg(model)
    with replaced_folder(folder, (), '--output') as staging:  # whole, or nothing left there
        write_folder(staging, ckpt, model, dense, plain)
        loaded = reload(staging, plain, method, cfg)
        with torch.no_grad():
            agreement = compare(model, lambda batch: loaded(batch).numpy(), images, len(images))
        if agreement.max_prob_diff > TOLERANCE or agreement.top1_agreement < 1:
            raise UserError(f"the folder does not reproduce the checkpoint's model ({agreement}); please report the "
                            f"model, method and settings")
        macs = count_macs(model, images[:MAC_IMAGES])[0] / 1e9, count_macs(dense, images[:1])[0] / 1e9
        params_m = sum(p.numel() for p in model.parameters()) / 1e6
        facts = CardFacts(push_to, push_to.split('/')[-1] if push_to else folder.name, ckpt, method, cfg, plain,
                          CHECKPOINT_FILE, *macs, len(images[:MAC_IMAGES]), params_m)
        (staging / 'README.md').write_text(model_card(facts), encoding='utf-8')
    info = dict(folder=str(folder), files=sorted(p.name for p in folder.iterdir()), model=ckpt['model_name'],
                method=method, method_cfg=cfg, plain=plain, check=agreement, mac_ratio=macs[0] / macs[1])
    if push_to:
        info['url'] = push(folder, push_to)
    return info
