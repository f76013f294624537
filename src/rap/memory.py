"""MemoryModel: bytes of parameters, KV cache and activations for (mask, request, KV keep ratio).

Everything the policy and the engine decide is checked against this model, so each term is
written from what the forward pass actually allocates, not fitted:

* params: the base (embeddings, norms, lm_head; tied weights once) plus the kept blocks;
* KV cache: preallocated for prompt + new tokens, only for kept attention blocks
  (a sliding-window layer holds at most its window); with a KV keep ratio r the prompt part
  shrinks to ceil(r * prompt) tokens per head on average (Ada-KV cache, no padding), and
  decoded tokens are appended uncompressed;
* activations: the larger of the prefill peak (one decoder layer's transients on top of the
  residual stream, plus the attention mask and the last-position logits) and the decode peak
  (logits over the vocabulary in fp32 and the sampler's copies, which often dominate at batch > 1).

`benchmarks/memory_model.py` checks the total against `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import RequestError
from .mask import BlockMask
from .model import BlockView, ModelShape


@dataclass(frozen=True)
class Request:
    """A batch of `batch` prompts of `prompt` tokens (after padding), generating `new_tokens` each."""

    batch: int
    prompt: int
    new_tokens: int

    def __post_init__(self) -> None:
        for field in ("batch", "prompt", "new_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise RequestError(f"{field} must be a positive integer, got {value!r}")

    @property
    def total_tokens(self) -> int:
        return self.prompt + self.new_tokens


@dataclass(frozen=True)
class MemoryBreakdown:
    param_bytes: int
    kv_bytes: int
    prefill_activation_bytes: int
    decode_activation_bytes: int

    @property
    def activation_bytes(self) -> int:
        return max(self.prefill_activation_bytes, self.decode_activation_bytes)

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.kv_bytes + self.activation_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "activation_bytes": self.activation_bytes, "total_bytes": self.total_bytes}


class MemoryModel:
    """Predicts peak device bytes of rap's generate path for a model shape."""

    # cuBLAS keeps a 32 MiB workspace per handle in PyTorch's caching allocator on CUDA (:4096:8)
    CUDA_WORKSPACE_BYTES = 8 * 4096 * 1024

    def __init__(self, shape: ModelShape, base_bytes: int, block_bytes: dict[str, int], on_cuda: bool = False):
        self.shape = shape
        self.base_bytes = base_bytes
        self.block_bytes = dict(block_bytes)
        self.runtime_bytes = self.CUDA_WORKSPACE_BYTES if on_cuda else 0

    @classmethod
    def from_view(cls, view: BlockView, on_cuda: bool | None = None) -> "MemoryModel":
        if on_cuda is None:
            on_cuda = view.device.type == "cuda"
        return cls(view.shape, view.base_bytes, {b.name: b.param_bytes for b in view.blocks}, on_cuda)

    # ---- terms ----------------------------------------------------------------------------
    def param_bytes(self, mask: BlockMask) -> int:
        return self.base_bytes + sum(n for name, n in self.block_bytes.items() if mask.keeps(name))

    def kv_tokens(self, request: Request, kv_ratio: float = 1.0, layer: int | None = None) -> int:
        """Tokens cached per (sequence, KV head) in one layer."""
        if not 0.0 < kv_ratio <= 1.0:
            raise RequestError(f"kv ratio must be in (0, 1], got {kv_ratio}")
        prompt = request.prompt if kv_ratio >= 1.0 else math.ceil(kv_ratio * request.prompt)
        tokens = prompt + request.new_tokens
        s = self.shape
        if layer is not None and s.layer_types and s.layer_types[layer] == "sliding_attention" and s.sliding_window:
            tokens = min(tokens, s.sliding_window)
        return tokens

    def kv_bytes(self, request: Request, mask: BlockMask, kv_ratio: float = 1.0) -> int:
        per_token = self.shape.kv_bytes_per_token_per_layer
        return sum(request.batch * self.kv_tokens(request, kv_ratio, i) * per_token for i in mask.kept_attn_layers)

    def kv_bytes_per_token(self, mask: BlockMask | None = None) -> int:
        layers = self.shape.num_layers if mask is None else len(mask.kept_attn_layers)
        return layers * self.shape.kv_bytes_per_token_per_layer

    def prefill_activation_bytes(self, request: Request, mask: BlockMask) -> int:
        s = self.shape
        B, T, e = request.batch, request.prompt, s.dtype_bytes
        q_width, kv_width = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        # residual stream + its normed copy live through every layer; cos/sin once; RMSNorm
        # computes in fp32 (two fp32 copies of its input while it runs)
        stream = B * T * ((2 * s.hidden_size + 2 * s.head_dim) * e + 2 * s.hidden_size * 4)
        # MLP: act(gate), up and their product are alive together
        mlp = 3 * B * T * s.intermediate_size * e if any(mask.keep_ffn) else 0
        # attention: q, k, v, their rotated copies, the SDPA output and o_proj's output
        attn = B * T * (3 * q_width + 4 * kv_width + s.hidden_size) * e if any(mask.keep_attn) else 0
        # boolean causal mask over the whole (static) key length
        attn_mask = B * T * request.total_tokens if any(mask.keep_attn) else 0
        # last-position logits, plus their fp32 copy
        logits = B * s.vocab_size * (e + 4)
        return stream + max(mlp, attn + attn_mask) + logits + self.runtime_bytes

    def decode_activation_bytes(self, request: Request, mask: BlockMask) -> int:
        s = self.shape
        B, e = request.batch, s.dtype_bytes
        layer = B * max(3 * s.intermediate_size, 4 * s.num_heads * s.head_dim) * e
        attn_mask = B * request.total_tokens
        # logits (dtype), fp32 copy, softmax/top-p sort values (fp32) and indices (int64)
        logits = B * s.vocab_size * (e + 4 + 4 + 8)
        return layer + attn_mask + logits + self.runtime_bytes

    # ---- answers --------------------------------------------------------------------------
    def breakdown(self, mask: BlockMask, request: Request, kv_ratio: float = 1.0) -> MemoryBreakdown:
        return MemoryBreakdown(
            param_bytes=self.param_bytes(mask),
            kv_bytes=self.kv_bytes(request, mask, kv_ratio),
            prefill_activation_bytes=self.prefill_activation_bytes(request, mask),
            decode_activation_bytes=self.decode_activation_bytes(request, mask),
        )

    def peak_bytes(self, mask: BlockMask, request: Request, kv_ratio: float = 1.0) -> int:
        return self.breakdown(mask, request, kv_ratio).total_bytes

    def fits(self, budget_bytes: int, mask: BlockMask, request: Request, kv_ratio: float = 1.0) -> bool:
        """Does (mask, request, kv_ratio) fit in `budget_bytes`?"""
        return self.peak_bytes(mask, request, kv_ratio) <= budget_bytes

    def dense_need(self, request: Request) -> int:
        return self.peak_bytes(BlockMask.full(self.shape.num_layers), request)


def parse_bytes(text: str | int | float) -> int:
    """'6GiB' / '512MB' / '1e9' / 123 -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}
    t = str(text).strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = None
    if value is None or unit not in units or value < 0:
        raise RequestError(f"cannot read {text!r} as a size: use e.g. 6GiB, 512MB or a number of bytes")
    return int(value * units[unit])


def format_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
