"""KV-cache compression that really frees memory: presses pick tokens per KV head at the end of
prefill, `VarlenCache` stores exactly those (no padding), varlen attention decodes over them."""

from .adakv import AdaKV, adaptive_keep_mask
from .base import Budget, LayerInputs, Press, ScorerPress
from .cache import FlatKV, VarlenCache, VarlenLayer
from .compress import Compressed, compress, generate
from .decode_cache import FlatLayerCache, KVLayout
from .pyramidkv import PyramidKV
from .scorer import DEFAULT_SCORER, SnapKVScorer
from .snapkv import SnapKV
from .streaming import StreamingLLM

PRESSES = {
    "streaming": StreamingLLM,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "adakv": lambda: AdaKV(SnapKV()),
    "ada-pyramidkv": lambda: AdaKV(PyramidKV()),
}


def make_press(name: str) -> Press:
    """'snapkv' | 'pyramidkv' | 'streaming' | 'adakv' (= AdaKV(SnapKV())) | 'ada-pyramidkv'."""
    from ..errors import RequestError

    key = name.strip().lower()
    if key not in PRESSES:
        raise RequestError(f"unknown press {name!r}; choose from {', '.join(PRESSES)}")
    return PRESSES[key]()


__all__ = ["DEFAULT_SCORER", "FlatLayerCache", "KVLayout", "SnapKVScorer", "AdaKV", "Budget", "Compressed", "FlatKV", "LayerInputs", "Press", "PyramidKV", "ScorerPress", "SnapKV",
           "StreamingLLM", "VarlenCache", "VarlenLayer", "adaptive_keep_mask", "compress", "generate", "make_press",
           "PRESSES"]
