"""MemoryModel: bytes of parameters, KV cache and activations for (mask, request, KV keep ratio).

Everything the policy and the engine decide is checked against this model, so each term is
written from what rap's decode path (`rap.decode.decoder.Decoder`) actually allocates, not fitted:

* params: the base (embeddings, norms, lm_head; tied weights once) plus the kept blocks, each at
  its plan level (`rap.core.plan.Plan`; a plain `BlockMask` keeps blocks at the model's dtype): an int8 /
  int4 block holds its linear weights as `rap.core.quant.quantize_weight` stores them (packed values,
  scales, zeros; `rap.core.quant.quantized_weight_bytes`, exact per device type) and its norms and biases
  as loaded;
* KV cache: preallocated for prompt + new tokens, only for kept attention blocks
  (a sliding-window layer holds at most its window); with a KV keep ratio r the prompt part
  shrinks to ceil(r * prompt) tokens per head on average (Ada-KV cache, no padding), and
  decoded tokens are appended uncompressed. With `kv_length_quantum` set (the decoder's dense
  [B, Hkv, T, D] buffers, which keep ceil(r * prompt) tokens in every head), the compressed
  length is rounded up to that quantum as the decoder rounds its buffers, never above prompt +
  new; on CUDA each dense key / value tensor is charged as PyTorch's caching allocator rounds it
  (`cuda_block_bytes`: up to 1 MiB more per tensor). The decoder's flat layout (Ada-KV, int8 / int4 KV;
  `kv_layout=rap.kv.decode_cache.KVLayout(...)`, or the model's `kv_layout` default that the engine
  sets) holds the same rows split over heads, plus int8 / int4 scales and per-segment starts / lengths:
  counted tensor by tensor (`rap.kv.decode_cache.layer_tensor_bytes`); under PyramidKV's layouts
  each layer holds its own budget (`kv_layer_tokens`, from `rap.kv.pyramidkv.pyramid_budgets`);
* fixed runtime bytes (CUDA only): one cuBLAS workspace per stream that ran a matmul, kept by
  PyTorch for the life of the process: the current stream's (prefill) and the decoder's one
  capture stream (warm-up and graph capture);
* the decoder's per-request buffers: sampling noise [B, V] fp32, the token record [B, T] int64,
  the RoPE cos/sin tables [T, head_dim];
* activations: the larger of
  - the prefill peak (the decoder prefills a few rows at a time, `PREFILL_CHUNK_TOKENS` tokens at
    most): the batch's prompt ids and fp32 logits, plus one chunk's residual stream [rows, P, hidden]
    and RoPE rows, plus
    the largest transient of one kept layer (the eager prefill frees each layer's tensors before
    the next: the fp32 RMSNorm, q/k/v and their rotation, flash attention's output, or the MLP's
    gate, up, act(gate) and product), and
  - the decode peak: the last-position logits in fp32 and the sampler (temperature, a full sort of
    the vocabulary with its radix-sort buffers, softmax / cumsum for top-p, Gumbel noise), which
    dominates at batch > 1 for large vocabularies; or, while a new decode step is compiled
    (torch.compile, the decoder's default on CUDA), Inductor's autotuning: an L2-sized buffer it
    fills between timed runs plus a copy of the largest tensor the timed kernel writes in place
    (one layer's key cache) or the head's logits. Sampling is assumed (greedy needs less).

Assumes prompts of equal length (the benchmark's and the usual planning case). A left-padded
batch also materialises a [B, 1, P, P] boolean attention mask (and SDPA's per-layer float copy
of it), which this model does not count.

`benchmarks/memory_model.py` checks the total against `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

from rap.errors import RequestError
from rap.core.mask import BlockMask
from rap.core.model import BlockView, ModelShape, same_tensor
from rap.core.plan import DROP, DTYPE, INT8, LEVELS, Plan, block_linears, int4_group_size
from rap.core.quant import HEAD_CHUNK_ROWS, INT4_CUDA_K_MULTIPLE, dequantize_transient_bytes, quantized_weight_bytes


PREFILL_CHUNK_TOKENS = 16384  # the decoder's prefill runs at most this many prompt tokens at once (whole rows)


def head_tensor_count(view) -> int:
    """1 when the lm_head shares the embedding's tensor (SmolLM2, Gemma), else 2."""
    return 1 if same_tensor(view.model.get_input_embeddings().weight, view.model.get_output_embeddings().weight) else 2


def prefill_rows(prompt: int, chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> int:
    """Rows of `prompt` tokens that one prefill chunk holds (at least one)."""
    return max(1, chunk_tokens // max(1, prompt))


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
    """Predicts peak device bytes of rap's generate path (`rap.decode.decoder.Decoder`) for a model shape."""

    # model types whose attention normalises q and k per head (an extra fp32 RMSNorm in the prefill)
    QK_NORM_MODEL_TYPES = ("qwen3", "qwen3_moe", "gemma3_text", "olmo2")

    def __init__(self, shape: ModelShape, base_bytes: int, block_bytes: dict[str, int], on_cuda: bool = False,
                 qk_norm: bool = False, compiled: bool | None = None, cublas_workspace_bytes: int | None = None,
                 l2_cache_bytes: int | None = None, kv_length_quantum: int | None = None,
                 prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS, head_tensors: int = 1):
        self.shape = shape
        self.head_tensors = head_tensors  # [vocab, hidden] tensors in base_bytes: 1 tied embedding / lm_head, 2 untied
        self.prefill_chunk_tokens = prefill_chunk_tokens
        # None: a compressed cache holds exactly its tokens (rap.kv's VarlenCache); an int: it is a
        # dense buffer whose length is rounded up to this many tokens (rap.decode.decoder.LENGTH_QUANTUM)
        self.kv_length_quantum = kv_length_quantum
        # True: a sliding-window layer caches at most its window (transformers' sliding cache layers);
        # False: every kept layer holds the whole length (rap.decode.decoder's static buffers, window masked)
        self.window_bounded_kv = True
        # default KV layout for kv_bytes (a rap.kv.decode_cache.KVLayout; None: dense buffers): the
        # engine sets the decoder's, so every plan counts the flat Ada-KV cache it will run
        self.kv_layout = None
        self.base_bytes = base_bytes
        self.block_bytes = dict(block_bytes)
        self.dense_block_bytes = dict(block_bytes)  # at the model's dtype (block_bytes may be leveled)
        self.levels: Plan | None = None  # with_levels: the level a plain mask's kept blocks are at
        self._memo: dict = {}  # (term, plan[, tokens]) -> bytes: a policy asks about the same plans often
        self.qk_norm = qk_norm
        self.fused_projections = False  # True for a Decoder(fuse_projections="copy" / "inplace"): see the FFN phases
        self.on_cuda = on_cuda
        self.runtime_bytes = 0
        self.autotune_buffer_bytes = 0
        if on_cuda:
            ws = cublas_workspace_bytes if cublas_workspace_bytes is not None else cuda_cublas_workspace_bytes()
            # two streams run matmuls: the current one (prefill, RoPE table) and the decoder's capture
            # stream (warm-up + graph capture, `rap.decode.decoder.capture_stream`); each keeps its workspace
            self.runtime_bytes = 2 * ws
            if compiled is None or compiled:  # the Decoder compiles its block functions by default on CUDA
                # torch._inductor.runtime.benchmarking: `torch.empty(L2_cache_size // 4, dtype=int)`,
                # zeroed between timed runs to flush the L2, while a kernel with several configs is tuned
                self.autotune_buffer_bytes = l2_cache_bytes if l2_cache_bytes is not None else cuda_l2_cache_bytes()

    @classmethod
    def from_view(cls, view: BlockView, on_cuda: bool | None = None,
                  kv_length_quantum: int | None = None) -> "MemoryModel":
        if on_cuda is None:
            on_cuda = view.device.type == "cuda"
        qk_norm = getattr(view.config, "model_type", "") in cls.QK_NORM_MODEL_TYPES
        return cls(view.shape, view.base_bytes, {b.name: b.param_bytes for b in view.blocks}, on_cuda, qk_norm,
                   kv_length_quantum=kv_length_quantum, head_tensors=head_tensor_count(view))

    # ---- terms ----------------------------------------------------------------------------
    def head_bytes(self, level: str = DTYPE) -> int:
        """Device bytes of the embedding and lm_head (once when tied) at `level` (dtype or int8)."""
        V, H, e = self.shape.vocab_size, self.shape.hidden_size, self.shape.dtype_bytes
        per = V * H * e if level == DTYPE else quantized_weight_bytes(V, H, level, e, "cuda" if self.on_cuda else "cpu")
        return self.head_tensors * per

    def base_bytes_at(self, head_level: str = DTYPE) -> int:
        """What stays resident beside the blocks (embedding, norms, lm_head), with the head at `head_level`."""
        return self.base_bytes if head_level == DTYPE else self.base_bytes - self.head_bytes() + self.head_bytes(head_level)

    def level_bytes(self, name: str, level: str) -> int:
        """Device bytes of block `name` at `level`: its linear weights as that level stores them
        (on this model's device type) plus the rest of the block (norms, biases) as loaded."""
        dense = self.dense_block_bytes[name]
        if level == DROP:
            return 0
        if level == DTYPE:
            return dense
        key = ("level", name, level)
        if key not in self._memo:
            self._memo[key] = self._quantized_block_bytes(name, level, dense)
        return self._memo[key]

    def _quantized_block_bytes(self, name: str, level: str, dense: int) -> int:
        e = self.shape.dtype_bytes
        device = "cuda" if self.on_cuda else "cpu"
        linears = block_linears(name.split(".")[0], self.shape)
        return dense + sum(quantized_weight_bytes(N, K, level, e, device) - N * K * e for _, N, K in linears)

    def with_levels(self, plan: Plan) -> "MemoryModel":
        """This model seen by code that only knows masks: a plain `BlockMask`'s kept blocks are at
        `plan`'s levels (its drops aside). Lets a drop-only policy choose drops on top of int4 blocks."""
        import copy

        out = copy.copy(self)
        out._memo = {}
        out.levels = Plan.of(plan)
        out.block_bytes = {name: self.level_bytes(name, lv if lv != DROP else DTYPE) for name, lv in out.levels.items()}
        return out

    def _as_plan(self, mask: BlockMask) -> BlockMask:
        if self.levels is None or isinstance(mask, Plan):
            return mask
        key = ("as_plan", mask)
        if key not in self._memo:
            self._memo[key] = self._leveled(mask)
        return self._memo[key]

    def _leveled(self, mask: BlockMask) -> Plan:
        return self.levels.with_levels({n: (lv if lv != DROP else DTYPE) if mask.keeps(n) else DROP
                                        for n, lv in self.levels.items()})

    def block_level_bytes(self) -> dict[str, dict[str, int]]:
        """{block: {level: bytes}} for every block and every level its shape allows (the table a
        profile or a policy over levels works from)."""
        out = {}
        for name in self.block_bytes:
            kind = name.split(".")[0]
            ins = [K for _, _, K in block_linears(kind, self.shape)]
            out[name] = {lv: self.level_bytes(name, lv) for lv in LEVELS
                         if int4_group_size(lv) is None or all(K % int4_group_size(lv) == 0 for K in ins)}
        return out

    def param_bytes(self, mask: BlockMask) -> int:
        mask = self._as_plan(mask)
        if isinstance(mask, Plan):
            key = ("params", mask)
            if key not in self._memo:
                self._memo[key] = self.base_bytes_at(mask.head_level) + sum(self.level_bytes(name, level)
                                                                            for name, level in mask.items())
            return self._memo[key]
        return self.base_bytes + sum(n for name, n in self.block_bytes.items() if mask.keeps(name))

    def param_bytes_by_level(self, mask: BlockMask) -> dict[str, int]:
        """Resident block bytes per level under `mask` (the base apart, under "base")."""
        plan = Plan.of(self._as_plan(mask))
        out = {"base": self.base_bytes_at(plan.head_level)}
        for name, level in plan.items():
            out[level] = out.get(level, 0) + self.level_bytes(name, level)
        return out

    def quant_transient_bytes(self, mask: BlockMask, tokens: int = 1) -> int:
        """The largest transient a quantized linear of `mask` adds for `tokens` rows: an int8 weight
        cast to the dtype (eager `Int8Tensor` linear), or on CUDA tinygemm's bf16 copy of the input
        padded to a multiple of 1024 features."""
        mask = self._as_plan(mask)
        if not isinstance(mask, Plan) or not mask.is_quantized:
            return 0
        key = ("transient", mask)  # (bytes whatever the rows, bytes per row): memoised per plan, not per tokens
        if key not in self._memo:
            self._memo[key] = self._quant_transient_terms(mask)
        fixed, per_token = self._memo[key]
        return max(fixed, tokens * per_token)

    def _quant_transient_terms(self, mask: Plan) -> tuple[int, int]:
        e, fixed, per_token = self.shape.dtype_bytes, 0, 0
        device = "cuda" if self.on_cuda else "cpu"
        if mask.head_level != DTYPE:  # the lm_head's int8 weight (torchao's eager linear casts it whole)
            rows = min(self.shape.vocab_size, HEAD_CHUNK_ROWS)  # rap.core.layers.head_linear's chunks
            fixed = dequantize_transient_bytes(rows, self.shape.hidden_size, mask.head_level, e, device)
        kinds = {(kind, level) for kind, levels in (("attn", mask.attn_levels), ("ffn", mask.ffn_levels))
                 for level in set(levels) if level == INT8 or level.startswith("int4g")}
        for kind, level in kinds:
            if level == INT8:
                fixed = max(fixed, max(dequantize_transient_bytes(N, K, level, e, device)
                                       for _, N, K in block_linears(kind, self.shape)))
            elif int4_group_size(level) is not None and self.on_cuda:
                K = max(K for _, _, K in block_linears(kind, self.shape))
                per_token = max(per_token, INT4_CUDA_K_MULTIPLE * math.ceil(K / INT4_CUDA_K_MULTIPLE) * 2)
        return fixed, per_token

    def kv_tokens(self, request: Request, kv_ratio: float = 1.0, layer: int | None = None,
                  kept: int | None = None) -> int:
        """Tokens cached per (sequence, KV head) in one layer. kept: the prompt tokens this layer keeps
        per head on average (default ceil(kv_ratio * prompt); a PyramidKV layer's own budget)."""
        if not 0.0 < kv_ratio <= 1.0:
            raise RequestError(f"kv ratio must be in (0, 1], got {kv_ratio}")
        if kept is None:
            kept = request.prompt if kv_ratio >= 1.0 else math.ceil(kv_ratio * request.prompt)
        tokens = kept + request.new_tokens
        if kv_ratio < 1.0 and self.kv_length_quantum:
            q = self.kv_length_quantum
            tokens = min(request.total_tokens, q * math.ceil(tokens / q))
        s = self.shape
        if (self.window_bounded_kv and layer is not None and s.layer_types
                and s.layer_types[layer] == "sliding_attention" and s.sliding_window):
            tokens = min(tokens, s.sliding_window)
        return tokens

    def kv_layer_tokens(self, request: Request, mask: BlockMask, kv_ratio: float = 1.0,
                        kv_layout=None) -> dict[int, int]:
        """Tokens cached per (sequence, KV head) in each kept attention layer: `kv_tokens` of every
        layer, or under a PyramidKV layout (`KVLayout.pyramid`) each layer's own budget
        (`rap.kv.pyramidkv.pyramid_budgets` over the kept attention layers, first to last) plus the
        new tokens, rounded like every cache length: what the decoder allocates per layer."""
        layers = mask.kept_attn_layers
        kv_layout = kv_layout if kv_layout is not None else self.kv_layout
        if kv_ratio >= 1.0 or kv_layout is None or not getattr(kv_layout, "pyramid", False):
            return {i: self.kv_tokens(request, kv_ratio, i) for i in layers}
        kept = max(1, math.ceil(kv_ratio * request.prompt))
        budgets = kv_layout.layer_budgets(len(layers), request.prompt, kept)
        return {i: self.kv_tokens(request, kv_ratio, i, k) for i, k in zip(layers, budgets)}

    def kv_bytes(self, request: Request, mask: BlockMask, kv_ratio: float = 1.0, kv_layout=None) -> int:
        """KV cache bytes: on CUDA, as the caching allocator charges the decoder's dense [B, Hkv, T, D]
        key and value tensors (block rounding, see `cuda_block_bytes`); else their exact size.

        kv_layout: a `rap.kv.decode_cache.KVLayout` whose cache is flat (Ada-KV, PyramidKV, int8 / int4 KV):
        every tensor of its `FlatLayerCache` (keys, values (int4: two per byte), scales, segment starts / lengths), each
        rounded as the allocator rounds it on CUDA. None or a dense layout: the dense buffers above.
        """
        return sum(self.kv_layer_bytes(request, mask, kv_ratio, kv_layout).values())

    def kv_layer_bytes(self, request: Request, mask: BlockMask, kv_ratio: float = 1.0,
                       kv_layout=None) -> dict[int, int]:
        """`kv_bytes` per kept attention layer (under PyramidKV each layer's own; a layer's bytes depend
        on the whole mask, whose kept layers the pyramid spreads the budget over)."""
        kv_layout = kv_layout if kv_layout is not None else self.kv_layout
        if kv_layout is not None and kv_layout.flat and (kv_ratio < 1.0 or kv_layout.bits != 16):
            from rap.kv.decode_cache import layer_tensor_bytes

            s = self.shape
            out, by_tokens = {}, {}  # layers of one length cost alike: counted once per length
            for i, tokens in self.kv_layer_tokens(request, mask, kv_ratio, kv_layout).items():
                if tokens not in by_tokens:
                    sizes = layer_tensor_bytes(request.batch, s.num_kv_heads, tokens, s.head_dim, s.dtype_bytes,
                                               kv_layout.bits)
                    by_tokens[tokens] = sum(self.allocated_bytes(n) for n in sizes)
                out[i] = by_tokens[tokens]
            return out
        per_token = self.shape.kv_bytes_per_token_per_layer
        dense = kv_ratio >= 1.0 or self.kv_length_quantum is not None
        out = {}
        for i in mask.kept_attn_layers:
            layer = request.batch * self.kv_tokens(request, kv_ratio, i) * per_token
            if self.on_cuda and dense:
                layer = 2 * cuda_block_bytes(layer // 2)
            out[i] = layer
        return out

    def kv_bytes_per_token(self, mask: BlockMask | None = None) -> int:
        layers = self.shape.num_layers if mask is None else len(mask.kept_attn_layers)
        return layers * self.shape.kv_bytes_per_token_per_layer

    def buffer_bytes(self, request: Request) -> int:
        """The decoder's per-(batch, length) buffers, alive from capture to the end of the request."""
        s = self.shape
        B, T = request.batch, request.total_tokens
        noise = 4 * B * s.vocab_size  # [B, V] fp32 uniform noise for the Gumbel-max sampler
        record = 8 * B * T + 8 * T  # generated token per column [B, T] int64, column index [T] int64
        rope = 2 * T * s.head_dim * s.dtype_bytes  # cos and sin [T, head_dim]
        return noise + record + rope

    def sampler_bytes(self, batch: int) -> int:
        """Peak of the last-position logits (fp32) plus `rap.decode.decoder.pick_tokens` (temperature + top-p).

        The full sort over the vocabulary dominates: logits / temperature (4), the sorted values (4)
        and their int64 indices (8), plus PyTorch's CUDA sort buffers (aten/src/ATen/native/cuda/
        Sort.cu, CUB radix sort without double buffering): with 2..127 rows it sorts (value,
        (row, index)) pairs once and the pairs again by row: two int2 arrays (8 + 8), a key output
        (4) and CUB's alternate keys and pair values (4 + 8) = 32 bytes per element; with one row
        (or >= 128) an int64 index iota (8) and CUB's alternate keys and values (4 + 8) = 20. After
        the sort, softmax / cumsum / mask / Gumbel noise hold at most 29 bytes per element.
        """
        B, V = batch, self.shape.vocab_size
        sort_buffers = 32 if 1 < B < 128 else 20
        during_sort = 4 + 4 + 4 + 8 + sort_buffers
        return B * V * max(during_sort, 29)

    def allocated_bytes(self, size: int) -> int:
        """What one tensor of `size` bytes costs: as the caching allocator charges it on CUDA
        (`cuda_block_bytes`), exactly on CPU."""
        return cuda_block_bytes(size) if self.on_cuda else size

    def prefill_layer_bytes(self, mask: BlockMask, tokens: int) -> tuple[int, int]:
        """Transient bytes of one kept (attention, FFN) block in the eager prefill of `tokens` prompt
        tokens, on top of the residual stream: the largest phase's live tensors, each charged as the
        CUDA caching allocator rounds it (`cuda_block_bytes`) on CUDA, exactly on CPU; 0 for a kind of
        block the mask drops everywhere."""
        kinds = (any(mask.keep_attn), any(mask.keep_ffn), self.fused_projections)
        memo = self._memo.setdefault("prefill layer", {})  # (kinds, tokens) -> bytes, bounded
        key = (kinds, tokens)
        if key not in memo:
            tensors = self._memo.get(("prefill tensors", kinds))
            if tensors is None:
                tensors = self._memo[("prefill tensors", kinds)] = self._prefill_layer_tensors(*kinds[:2])
            charged = {b: self.allocated_bytes(tokens * b) for b in {b for ps in tensors for p in ps for b in p}}
            memo[key] = tuple(max((sum(charged[b] for b in p) for p in ps), default=0) for ps in tensors)
            if len(memo) > 4096:
                memo.pop(next(iter(memo)))
        return memo[key]

    def _prefill_layer_tensors(self, attn_kept: bool, ffn_kept: bool) -> tuple[list, list]:
        """(attention phases, FFN phases): per phase, the bytes per token of each live tensor
        (rap.core.layers, op by op; checked against a CUDA memory snapshot on the H200)."""
        s, e = self.shape, self.shape.dtype_bytes
        h, I, H = s.hidden_size, s.intermediate_size, s.num_heads
        qw, kw = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        rms = (4 * h, 4 * h)  # RMSNorm in fp32: the upcast input and its square / normalised product
        attn, ffn = [], []
        if attn_kept:
            attn = [
                rms,
                (e * h, e * qw, e * kw, e * kw),  # normed input, q, k, v
                (e * qw, e * kw, e * kw, e * qw, e * qw, e * qw),  # + rotating q: x*cos, rotate_half(x), its *sin
                (e * qw, e * kw, e * kw, e * kw, e * kw, e * kw),  # rotated q, k, v + rotating k
                (e * qw, e * kw, e * kw, e * qw, 4 * H),  # q, k, v + SDPA's output (+ flash's fp32 log-sum-exp)
                (e * qw, e * h, e * h),  # attention output, o_proj's output and the new residual
            ]
            if self.qk_norm:  # q, k, v + RMSNorm of q in fp32
                attn.append((e * qw, e * kw, e * kw, 4 * qw, 4 * qw))
        if ffn_kept:
            # gate and up are two tensors and `g = act(g)` frees the gate once its activation exists;
            # a fused [gate; up] output (`Decoder(fuse_projections=...)`) is one buffer, freed with up
            gate_up = (2 * e * I,) if self.fused_projections else (e * I,)
            ffn = [
                rms,
                (e * h, *gate_up, e * I, e * I),  # normed input, (gate,) up, act(gate), act(gate) * up
                (e * h, *gate_up, e * I, e * I, e * h),  # ... + down's output
                (e * h, *gate_up, e * I, e * h, e * h),  # normed input, up, act(gate), down's output, new residual
            ]
        return attn, ffn

    def prefill_activation_bytes(self, request: Request, mask: BlockMask) -> int:
        """The prefill runs `prefill_rows` rows at a time: the whole batch's prompt ids and its fp32
        last-position logits live throughout; one chunk's stream and one layer's transients on top."""
        s, e = self.shape, self.shape.dtype_bytes
        B, P = request.batch, request.prompt
        rows = min(B, prefill_rows(P, self.prefill_chunk_tokens))
        tokens = rows * P
        whole = 8 * B * P + 4 * B * s.vocab_size  # prompt ids (int64) and the batch's logits (fp32)
        # one chunk: residual stream, positions (int64), RoPE rows cos/sin [rows, P, head_dim]
        charge = self.allocated_bytes
        stream = (charge(tokens * e * s.hidden_size) + charge(tokens * 8) + 2 * charge(tokens * e * s.head_dim)
                  + 8 * P)
        layers = stream + max(self.prefill_layer_bytes(mask, tokens)) + self.quant_transient_bytes(mask, tokens)
        # after the chunk's last layer: its residual stream and last-position logits (dtype, then fp32)
        head = tokens * e * s.hidden_size + rows * s.vocab_size * (e + 4)
        return whole + max(layers, head) + self.buffer_bytes(request) + self.runtime_bytes

    def decode_activation_bytes(self, request: Request, mask: BlockMask) -> int:
        s, e = self.shape, self.shape.dtype_bytes
        B, T = request.batch, request.total_tokens
        qw = s.num_heads * s.head_dim
        # one block's transients for one token per row, the key mask [B, T] and its float copy
        layer = B * max(3 * s.intermediate_size, 4 * qw) * e + B * T * (1 + e) + self.quant_transient_bytes(mask, B)
        logits = B * s.vocab_size * (e + 4)  # lm_head output, then its fp32 copy
        peak = max(layer, logits, self.sampler_bytes(B))
        if self.autotune_buffer_bytes:
            # compiling a new step shape: the flush buffer plus a copy of what the tuned kernel writes
            # in place (the index_copy into one layer's key or value cache), or the head's logits
            kv_layer = B * s.num_kv_heads * T * s.head_dim * e if any(mask.keep_attn) else 0
            peak = max(peak, self.autotune_buffer_bytes + max(kv_layer, logits))
        return peak + self.buffer_bytes(request) + self.runtime_bytes

    # ---- answers --------------------------------------------------------------------------
    def breakdown(self, mask: BlockMask, request: Request, kv_ratio: float = 1.0, kv_layout=None) -> MemoryBreakdown:
        return MemoryBreakdown(
            param_bytes=self.param_bytes(mask),
            kv_bytes=self.kv_bytes(request, mask, kv_ratio, kv_layout),
            prefill_activation_bytes=self.prefill_activation_bytes(request, mask),
            decode_activation_bytes=self.decode_activation_bytes(request, mask),
        )

    def peak_bytes(self, mask: BlockMask, request: Request, kv_ratio: float = 1.0, kv_layout=None) -> int:
        return self.breakdown(mask, request, kv_ratio, kv_layout).total_bytes

    def fits(self, budget_bytes: int, mask: BlockMask, request: Request, kv_ratio: float = 1.0,
             kv_layout=None) -> bool:
        """Does (mask, request, kv_ratio[, kv_layout]) fit in `budget_bytes`?"""
        return self.peak_bytes(mask, request, kv_ratio, kv_layout) <= budget_bytes

    def dense_need(self, request: Request) -> int:
        return self.peak_bytes(BlockMask.full(self.shape.num_layers), request)


def cuda_cublas_workspace_bytes(device=None) -> int:
    """Size of the cuBLAS workspace PyTorch allocates per stream (aten/src/ATen/cuda/CublasHandlePool.cpp):
    CUBLAS_WORKSPACE_CONFIG (":SIZE_KiB:COUNT" pairs) if set, else 32 MiB on Hopper/Blackwell
    (compute capability 9.x, 10.x, 12.x) and 4096 KiB * 2 + 16 KiB * 8 before."""
    import os
    import re

    config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if config:
        pairs = re.findall(r":([0-9]+):([0-9]+)", config)
        if pairs:
            return sum(int(size) * 1024 * int(count) for size, count in pairs)
    import torch

    if not torch.cuda.is_available():  # planning for a GPU from a machine without one: assume Hopper
        return 4096 * 8 * 1024
    major = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device()).major
    return 4096 * 8 * 1024 if major in (9, 10, 12) else 4096 * 1024 * 2 + 16 * 1024 * 8


@functools.lru_cache(maxsize=1 << 16)  # pure in `size`; a policy's decide asks it per layer and option
def cuda_block_bytes(size: int) -> int:
    """Bytes PyTorch's CUDA caching allocator charges (memory_allocated) for one tensor of `size` bytes
    allocated from fresh segments, default config (c10/cuda/CUDACachingAllocator.cpp): sizes round
    up to 512 B; up to 1 MiB come from 2 MiB segments split exactly; from 10 MiB a tensor gets its
    own segment rounded up to 2 MiB, and a remainder of at most 1 MiB is not split off but charged
    to the tensor; in between, tensors are carved out of 20 MiB segments one after another and the
    last one of a segment takes a remainder of at most 1 MiB (amortised here over the segment)."""
    MiB = 2**20
    size = max(512, 512 * math.ceil(size / 512))
    if size <= MiB:
        return size
    if size >= 10 * MiB:
        segment = 2 * MiB * math.ceil(size / (2 * MiB))
        return segment if segment - size <= MiB else size
    charged, remaining, count = 0, 20 * MiB, 0
    while remaining >= size:  # one 20 MiB segment
        count += 1
        if remaining - size > MiB:
            charged, remaining = charged + size, remaining - size
        else:
            charged, remaining = charged + remaining, 0
    return math.ceil(charged / count)


def cuda_l2_cache_bytes(device=None) -> int:
    """The GPU's L2 cache size (50 MiB on the H100), which Inductor's autotuner allocates to flush it."""
    import torch

    if not torch.cuda.is_available():
        return 50 * 2**20
    return int(torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
               .L2_cache_size)


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
