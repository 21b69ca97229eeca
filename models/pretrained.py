"""What ``--pretrained`` names, and weights from the Hugging Face hub through timm.

A value is read in this order: an existing path is a weights file; ``hf-hub:ORG/NAME`` is that hub repository's
weights for the model's architecture; a value that looks like a path (a ``/``, or a weights file's ending) is a
file that does not exist (``read_checkpoint`` says so); a timm pretrained tag (``deit_small_patch16_224.fb_in1k``,
or ``fb_in1k`` of the model) is that tag's weights; ``True`` (``--pretrained`` alone) is the model's default tag.

Hub weights come through timm's ``load_state_dict_from_hf`` into the usual Hugging Face cache (and from it alone
with HF_HUB_OFFLINE=1). The factory then loads them as it loads a file, because timm's own ``pretrained=True`` loads
weights of another depth half-way without a word.
"""
import os
from dataclasses import dataclass
from typing import Union

from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from timm.models import get_pretrained_cfg, list_pretrained, load_state_dict_from_hf, split_model_name_tag

from utils.errors import UserError

HF_HUB_PREFIX = 'hf-hub:'
SCRATCH = 'none'  # --pretrained none: random initialisation
FILE_ENDINGS = ('.pth', '.pt', '.pth.tar', '.bin', '.safetensors')
FORMS = "give a .pth/.safetensors path, hf-hub:ORG/NAME, or a tag such as deit_small_patch16_224.fb_in1k"


@dataclass(frozen=True)
class HubWeights:
    """Weights in a hub repository; ``variant`` is what timm builds, so its pretrained_cfg (mean, std, crop) applies."""
    label: str    # as the user named them
    variant: str  # 'arch.tag', or the --model for an hf-hub: repository
    hub_id: str   # ORG/NAME[@revision]

    def state_dict(self) -> dict:
        """The repository's weights, from the cache or the hub; a one-line UserError when neither has them."""
        try:
            return load_state_dict_from_hf(self.hub_id)
        except (HfHubHTTPError, EntryNotFoundError, HFValidationError, AssertionError, OSError) as err:
            why, todo = _hub_failure(err, self.hub_id)
            raise UserError(f"could not get the weights of {self.label} from the Hugging Face hub ({self.hub_id}): "
                            f"{why}; {todo}") from None


def _hub_failure(err: Exception, hub_id: str):
    """(what went wrong, what to do) for an error of huggingface_hub."""
    if isinstance(err, (HFValidationError, AssertionError)):  # timm asserts a single @revision
        return f"'{hub_id}' is not a repository name", 'write it as hf-hub:ORG/NAME'
    if isinstance(err, RepositoryNotFoundError):  # also a gated or private one
        return ('the hub has no such repository, or it is private or gated',
                'check the name, or log in with `hf auth login`')
    if isinstance(err, RevisionNotFoundError):
        return 'the repository has no such revision', 'check the name after @'
    if isinstance(err, EntryNotFoundError) and not isinstance(err, LocalEntryNotFoundError):
        return 'the repository holds no model.safetensors or pytorch_model.bin', 'pass --pretrained FILE'
    if isinstance(err, HfHubHTTPError):
        return str(err).splitlines()[0][:200], 'try again later, or download the file and pass --pretrained FILE'
    if not isinstance(err, (LocalEntryNotFoundError, ConnectionError, TimeoutError)):  # e.g. a cache it cannot write
        return (f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else 'no detail'}",
                f"check the cache folder {constants.HF_HUB_CACHE} (HF_HUB_CACHE)")
    offline = ' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''
    return (f"not in the cache ({constants.HF_HUB_CACHE}) and the hub cannot be reached{offline}",
            'run once with network access, download the file and pass --pretrained FILE, or train from scratch '
            'with --pretrained none')


def _timm_cfg(name: str):
    """timm's pretrained config of ``name`` ('arch' for its default tag, or 'arch.tag'), or None if timm has none."""
    try:
        return get_pretrained_cfg(name)
    except RuntimeError:  # a known architecture without that tag
        return None


def _tags(arch: str) -> str:
    tags = [n.split('.', 1)[1] for n in list_pretrained(f'{arch}.*')]
    return ', '.join(tags[:4]) + (' ...' if len(tags) > 4 else '') if tags else 'none'


def _from_cfg(cfg) -> HubWeights:
    variant = f'{cfg.architecture}.{cfg.tag}'
    if not cfg.hf_hub_id:
        raise UserError(f"timm knows no Hugging Face hub weights for {variant}; download them and pass --pretrained FILE, "
                        f"or train from scratch with --pretrained none")
    return HubWeights(variant, variant, cfg.hf_hub_id)


def names_a_file(value: str) -> bool:
    """Whether a weights value (--pretrained, --teacher) names a file: an existing path always does, and so does a
    value that looks like a path (a ``/``, or a weights file's ending) unless it is ``hf-hub:ORG/NAME``."""
    return os.path.exists(value) or not value.startswith(HF_HUB_PREFIX) and (
        '/' in value or os.sep in value or value.endswith(FILE_ENDINGS))


def wants_weights(value: Union[str, bool, None]) -> bool:
    """Whether a --pretrained value asks for weights (None, False, '' and 'none' do not)."""
    return value not in (None, False, '', SCRATCH)


def describe_weights(model_name: str, value: Union[str, bool, None]) -> str:
    """What a run starts from, in one line, before anything is fetched: a file, hub weights (from the cache, or
    downloaded once into it) or random initialisation."""
    weights = resolve_pretrained(model_name, value)
    if weights is None:
        return 'from scratch: random initialisation'
    if not isinstance(weights, HubWeights):
        return f'weights: {weights}'
    repo, _, revision = weights.hub_id.partition('@')
    cached = any(isinstance(try_to_load_from_cache(repo, name, revision=revision or None), str)
                 for name in ('model.safetensors', 'pytorch_model.bin'))
    where = 'cache' if cached else 'hub'
    return (f"weights: {weights.label} from the Hugging Face {where} ({weights.hub_id})"
            + ('' if cached else f', downloading once into {constants.HF_HUB_CACHE}'))


def resolve_pretrained(model_name: str, value: Union[str, bool, None]) -> Union[None, str, HubWeights]:
    """None (no weights), the path of a weights file, or the hub weights that ``value`` names for ``model_name``."""
    if not wants_weights(value):
        return None
    arch = split_model_name_tag(model_name)[0]
    if value is True:
        cfg = _timm_cfg(model_name)
        if cfg is None:
            raise UserError(f"timm has no pretrained weights for '{model_name}'; pass --pretrained FILE, or a --model "
                            f"that has some (timm.list_pretrained())")
        return _from_cfg(cfg)
    value = str(value)
    if names_a_file(value):
        return value
    if value.startswith(HF_HUB_PREFIX):
        return HubWeights(value, model_name, value[len(HF_HUB_PREFIX):])
    cfg = _timm_cfg(f'{arch}.{value}') or _timm_cfg(value)
    if cfg is None:
        raise UserError(f"'{value}' is neither a weights file nor a timm pretrained tag: no such file, and the tags "
                        f"of {arch} are {_tags(arch)}; {FORMS}")
    if cfg.architecture != arch:
        raise UserError(f"'{value}' are timm weights of {cfg.architecture}, not of --model {model_name}; pass --model "
                        f"{cfg.architecture}, or a tag of {arch} ({_tags(arch)})")
    return _from_cfg(cfg)

