"""Models: one factory builds "timm ViT + token-reduction method"; one module per method."""
from .factory import build_model, load_backbone_state
from .registry import METHODS, apply_method

__all__ = ['build_model', 'load_backbone_state', 'METHODS', 'apply_method']
