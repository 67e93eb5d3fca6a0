"""SegCLIP's config: the key table (:mod:`.defaults`) and safe reading of config files
(:mod:`.load`)."""

from .defaults import PROMPT_TEMPLATE, REMOVED_KEYS, add_segclip_config
from .load import load_config

__all__ = ["PROMPT_TEMPLATE", "REMOVED_KEYS", "add_segclip_config", "load_config"]
