"""MaskEmbed training (`locality align`): config + recipes (`config`), the trainer (`train.train`,
`train.main`), training state (`state`), schedule (`optim`), torch.distributed set-up."""
from .config import RECIPES, AlignConfig, get_recipe, parse_config

__all__ = ["AlignConfig", "RECIPES", "get_recipe", "parse_config"]
