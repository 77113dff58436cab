"""hf_kvplug: a paged (optionally INT8) KV cache with fused Triton decode attention for HF generate()."""

from .cache import PlugCache, PlugLayer
from .compat import CACHE_KWARG
from .config import PlugConfig
from .flash import flash_attn_with_kvcache
from .ops import attend_with_kvcache, write_kvcache
from .patcher import SUPPORTED, is_patched, patch, patched, unpatch

__version__ = "0.1.0"

__all__ = [
    "CACHE_KWARG", "PlugCache", "PlugConfig", "PlugLayer", "SUPPORTED", "attend_with_kvcache",
    "flash_attn_with_kvcache", "is_patched", "patch",
    "patched",
    "unpatch", "write_kvcache",
]
