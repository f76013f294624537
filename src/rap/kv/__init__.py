"""KV-cache compression that really frees memory: presses pick tokens per KV head at the end of
prefill, `VarlenCache` stores exactly those (no padding), varlen attention decodes over them."""

from rap.kv.adakv import AdaKV, adaptive_keep_mask
from rap.kv.base import Budget, LayerInputs, Press, ScorerPress
from rap.kv.cache import FlatKV, VarlenCache, VarlenLayer
from rap.kv.compress import Compressed, compress, generate
from rap.kv.decode_cache import FlatLayerCache, KVLayout
from rap.kv.pyramidkv import PyramidKV
from rap.kv.scorer import DEFAULT_SCORER, SnapKVScorer
from rap.kv.snapkv import SnapKV
from rap.kv.streaming import StreamingLLM

PRESSES = {
    "streaming": StreamingLLM,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "adakv": lambda: AdaKV(SnapKV()),
    "ada-pyramidkv": lambda: AdaKV(PyramidKV()),
}


def make_press(name: str) -> Press:
    """'snapkv' | 'pyramidkv' | 'streaming' | 'adakv' (= AdaKV(SnapKV())) | 'ada-pyramidkv'."""
    from rap.errors import RequestError

    key = name.strip().lower()
    if key not in PRESSES:
        raise RequestError(f"unknown press {name!r}; choose from {', '.join(PRESSES)}")
    return PRESSES[key]()


__all__ = ["DEFAULT_SCORER", "FlatLayerCache", "KVLayout", "SnapKVScorer", "AdaKV", "Budget", "Compressed", "FlatKV", "LayerInputs", "Press", "PyramidKV", "ScorerPress", "SnapKV",
           "StreamingLLM", "VarlenCache", "VarlenLayer", "adaptive_keep_mask", "compress", "generate", "make_press",
           "PRESSES"]
