"""Fast masked decoding: a static KV cache for kept attention blocks only, one captured graph per mask.

`Decoder(view).generate(prompts, max_new_tokens, mask=...)` runs rap's own compact forward pass
(`rap.core.layers`) over the Hugging Face model's weights (no copies) instead of `model.generate`.
The Decoder ties its parts, which share one workspace (`rap.decode.workspace`: the static buffers
every captured graph reads):

* prefill (`rap.decode.prefill`): eager, one SDPA call per kept attention block, K/V straight into
  the cache; with a KV keep ratio, only the tokens `rap.decode.compress` keeps (SnapKV / Ada-KV);
* decode (`rap.decode.step`): one step = embedding -> kept blocks -> norm -> lm_head -> greedy or
  sampled pick (`rap.decode.sampling`) -> stop-token bookkeeping, all on the device. On CUDA that
  step is captured as a `torch.cuda.CUDAGraph` per (mask, batch bucket, cache length,
  greedy/sampled) and cached (`rap.decode.graphs`); on CPU the same step runs eagerly.

Why our own step rather than transformers' pieces (measured on an H100, Llama-2-7B shape, batch 1,
benchmarks/results/decode-2026-11-23.json): `generate` with its dynamic cache decodes at 43 tok/s
(20% of the bandwidth roofline; Python-bound); with a `StaticCache`, which makes transformers
compile the forward (reduce-overhead), it reaches 124 tok/s (57%), but only for the dense model:
a dropped attention block's `SkippedCacheLayer` is not compileable, and every mask would be a new
whole-model compile. This path reaches 169 tok/s (78%) dense, and a new mask costs ~50 ms of
capture because the compiled unit is one block, shared by all layers and masks. It is gpt-fast's
recipe on top of the HF modules' own parameters; the layer math mirrors transformers' op for op
(see rap.core.layers), so greedy tokens equal `generate`'s. `release()` frees graphs and buffers.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
from torch import nn

from rap.core.layers import (DECODE_MODEL_TYPES, STATIC_ROPE_TYPES, AttnWeights, FfnWeights, HeadWeights,  # noqa: F401 (re-exported)
                             attend_static, attn_decode_flat, attn_decode_static, attn_output, attn_weights,
                             check_static_rope, embed_scale, ffn_block, ffn_weights, final_logits, head_weights, is_gemma,
                             norm_eps, project_qkv, rms_norm, rope, rope_kinds, rope_tables, rotate_half)
from rap.core.mask import BlockMask
from rap.core.memory import PREFILL_CHUNK_TOKENS, MemoryModel, Request, format_bytes
from rap.core.model import BlockView
from rap.core.plan import DROP, DTYPE, Plan
from rap.core.quant import quantize_weight, storage_bytes, weight_level
from rap.decode.compress import (SNAPKV_KERNEL, SNAPKV_WINDOW, KeepPlan, kept_columns, keep_prompt,  # noqa: F401
                                 keep_prompt_flat, pyramid_plan, snapkv_scores)
from rap.decode.graphs import capture, capture_stream, compiled_block_functions  # noqa: F401 (capture_stream re-exported)
from rap.decode.prefill import prefill, prefill_attention  # noqa: F401 (prefill_attention re-exported)
from rap.decode.sampling import draw_noise, pick_tokens, row_generators
from rap.decode.step import exact_step, static_step
from rap.decode.workspace import (BATCH_BUCKETS, LENGTH_QUANTUM, MAX_STOP_IDS, Workspace,  # noqa: F401
                                  bucket_batch, bucket_length, planning_request)
from rap.errors import BudgetError, RequestError, UnsupportedModelError
from rap.kv.decode_cache import DECODER_PRESSES, FlatLayerCache, KVLayout, check_head_dim, layout_for  # noqa: F401 (re-exported)
from rap.kv.scorer import DEFAULT_SCORER, SnapKVScorer

log = logging.getLogger(__name__)


# ---- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    prefill_ms: float
    decode_ms: float
    decode_steps: int  # forward passes after prefill (new tokens - 1 unless every row stopped early)
    rows: int
    capture_ms: float  # graph capture paid by this call (0.0: the mask's graph was cached)
    graph: bool

    @property
    def ms_per_step(self) -> float:
        return self.decode_ms / self.decode_steps if self.decode_steps else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput over all rows (prefill excluded)."""
        return self.rows * self.decode_steps / (self.decode_ms / 1e3) if self.decode_ms > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"prefill_ms": self.prefill_ms, "decode_ms": self.decode_ms, "decode_steps": self.decode_steps,
                "rows": self.rows, "capture_ms": self.capture_ms, "graph": self.graph,
                "ms_per_step": self.ms_per_step, "tokens_per_s": self.tokens_per_s}


@dataclass(frozen=True)
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, up to and including the first stop token
    timing: Timing
    mask: BlockMask
    kv_ratio: float = 1.0
    kv_press: str | None = None  # when kv_ratio < 1, the press that picked the kept tokens (DECODER_PRESSES)
    kv_bits: int = 16  # 16: the model's dtype; 8: int8 keys and values; 4: packed int4


class Decoder:
    """Generates from a BlockView (or HF model) under any BlockMask and KV keep ratio, fast.

    `generate(prompts, n, mask=..., kv_ratio=0.2, on_step=fn)`: with kv_ratio < 1 every kept
    attention layer keeps ceil(kv_ratio * P_b) prompt tokens per (row, KV head) on average, split
    over heads by Ada-KV (kv_press="adakv", default) or uniformly ("snapkv"), or per layer by PyramidKV
    ("pyramidkv", "ada-pyramidkv"), optionally in int8 or int4 (kv_bits=8 / 4; see `rap.kv.decode_cache`), and the
    cache shrinks to what `MemoryModel.kv_bytes(request, mask, kv_ratio, kv_layout)` predicts; `on_step`
    receives each step's [n] new tokens (on the host; one device sync per step, only when given).

    Args:
        model: a `BlockView` or a supported HF causal LM (Llama, Mistral, Qwen2, Qwen3, Gemma 3).
        step: how decode steps run. "graph": the static step captured as a CUDA graph per mask
            (default on CUDA); "static": the same static step run eagerly (tests the captured code
            on CPU); "exact": eager, attending to the filled columns only through transformers' SDPA
            wrapper, so float32 tokens equal `generate`'s bit for bit (default on CPU).
        compile: run the per-block functions through `torch.compile` inside the graph (fuses the
            norm/RoPE/activation element-wise ops: 55% -> 73% of the bandwidth roofline on the H100
            at batch 1; ~9 s to compile once per process, ~3 s per new batch bucket). Default: on CUDA.
        attention: "sdpa" or "matmul" for the captured decode attention (prefill always uses SDPA).
        fuse_projections: one matmul for q/k/v and one for gate/up instead of five (larger GEMVs run
            closer to bandwidth at batch 1). "none" (default); "copy": concatenated copies, counted in
            `extra_weight_bytes`; "inplace": concatenate once, then re-point the HF parameters at row
            slices of the fused tensors and free the originals, so no byte is added (the model still
            works unchanged, but its q/k/v and gate/up parameters now share storage).
        budget_bytes: if given, refuse requests whose memory-model peak exceeds it.
    """

    def __init__(self, model: BlockView | nn.Module, *, step: str | None = None,
                 compile: bool | None = None, attention: str = "sdpa", fuse_projections: str = "none",
                 budget_bytes: int | None = None, check_every: int = 16):
        view = model if isinstance(model, BlockView) else BlockView(model)
        model_type = view.config.model_type
        if model_type not in DECODE_MODEL_TYPES:
            raise UnsupportedModelError(
                f"rap's fast decode path supports {', '.join(DECODE_MODEL_TYPES)}, not {model_type!r}; "
                "use the stock path (`with view.masked(mask): view.model.generate(...)`)")
        check_static_rope(view)
        if attention not in ("sdpa", "matmul"):
            raise ValueError(f"attention must be 'sdpa' or 'matmul', got {attention!r}")
        self.view = view
        self.memory = MemoryModel.from_view(view, kv_length_quantum=LENGTH_QUANTUM)
        # sliding-window layers get full-length buffers too (keys outside the window are masked, not
        # evicted: a ring buffer would save that memory but needs its own column bookkeeping)
        self.memory.window_bounded_kv = False
        self.device = view.device
        self.dtype = view.dtype
        self.step = step or ("graph" if self.device.type == "cuda" else "exact")
        if self.step not in ("graph", "static", "exact"):
            raise ValueError(f"step must be 'graph', 'static' or 'exact', got {step!r}")
        if self.step == "graph" and self.device.type != "cuda":
            raise RequestError("CUDA graphs need the model on a CUDA device: use step='static' or 'exact'")
        self.use_graphs = self.step == "graph"
        self.attention = attention
        self.check_every = max(1, check_every)
        self.budget_bytes = budget_bytes
        # prompts run through the prefill a few rows at a time, at most this many tokens together
        # (at least one row): the prefill's transients stay bounded however large the batch is
        self.prefill_chunk_tokens = PREFILL_CHUNK_TOKENS
        self.head_w = head_weights(view)  # embedding, final norm, lm_head: rap.core.forward reads the same
        self.pad_token_id = getattr(view.config, "pad_token_id", None)
        self.rope_kinds = rope_kinds(view)
        self.attn = [self._attn_weights(i) for i in range(view.num_layers)]
        self.ffn = [self._ffn_weights(i) for i in range(view.num_layers)]
        self.extra_weight_bytes = 0
        # (block name, level) -> that block's weights quantized from its resident dense copy (see block_weights)
        self._quantized: dict[tuple[str, str], AttnWeights | FfnWeights] = {}
        self._plan_weights: dict[BlockMask, tuple[list, list]] = {}
        self._validated: set[Plan] = set()
        if fuse_projections not in ("none", "copy", "inplace"):
            raise ValueError(f"fuse_projections must be 'none', 'copy' or 'inplace', got {fuse_projections!r}")
        self.fuse_projections = fuse_projections
        if fuse_projections != "none":
            self._fuse(in_place=fuse_projections == "inplace")
        self._attn_fn: Callable = attn_decode_static
        self._ffn_fn: Callable = ffn_block
        self._head_fn: Callable = final_logits
        self.compile = (self.device.type == "cuda") if compile is None else compile
        if self.compile:
            self._attn_fn, self._ffn_fn, self._head_fn = compiled_block_functions()
        self._workspaces: dict[tuple[int, int, int], Workspace] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._rope_tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_prepare_ms = 0.0

    # ---- weights ---------------------------------------------------------------------------------
    def _attn_weights(self, i: int) -> AttnWeights:
        return attn_weights(self.view, i, self.rope_kinds)

    def _ffn_weights(self, i: int) -> FfnWeights:
        return ffn_weights(self.view, i)

    @torch.no_grad()
    def _fuse(self, in_place: bool) -> None:
        """Concatenate q/k/v and gate/up once per layer: one matmul instead of three/two."""
        def cat(*ts):
            return None if any(t is None for t in ts) else torch.cat([t.detach() for t in ts], dim=0)

        def repoint(params, fused):  # HF parameters become row slices of `fused`; old storage is freed
            start = 0
            for p in params:
                p.data = fused[start:start + p.shape[0]]
                start += p.shape[0]

        for a, f in zip(self.attn, self.ffn):
            if weight_level(a.wq) == DTYPE:  # a block resident at int8 / int4 runs unfused (see block_weights)
                a.wqkv, a.bqkv = cat(a.wq, a.wk, a.wv), cat(a.bq, a.bk, a.bv)
            if weight_level(f.wg) == DTYPE:
                f.wgu, f.bgu = cat(f.wg, f.wu), cat(f.bg, f.bu)
            if in_place:
                if a.wqkv is not None:
                    repoint((a.wq, a.wk, a.wv), a.wqkv)
                if f.wgu is not None:
                    repoint((f.wg, f.wu), f.wgu)
                if a.bqkv is not None:
                    repoint((a.bq, a.bk, a.bv), a.bqkv)
                if f.bgu is not None:
                    repoint((f.bg, f.bu), f.bgu)
            else:
                for t in (a.wqkv, a.bqkv, f.wgu, f.bgu):
                    if t is not None:
                        self.extra_weight_bytes += t.numel() * t.element_size()

    # ---- precision levels -----------------------------------------------------------------------------
    def block_weights(self, mask: BlockMask) -> tuple[list[AttnWeights], list[FfnWeights]]:
        """Per-layer attention / FFN weights for `mask` (a `Plan` or a plain mask: every block at dtype).

        A block the plan keeps at the level its module's weights are resident at (the dtype as
        loaded, or int8 / int4 after `rap.serve.residency.WeightResidency` moved it) uses those weights as
        they are. A block resident at dtype that the plan wants quantized is quantized once from that
        copy and cached (counted in `extra_weight_bytes`: the dense copy stays, as it must for the
        next plan that keeps it dense); any other mismatch raises. Fused q/k/v and gate/up weights
        are quantized fused: int8's per-output-channel and int4's per-row groups never mix rows,
        so the values equal those of the three / two separate projections, and one GEMV stays one.
        Cached per plan, so a captured graph always sees the same tensors.
        """
        key = mask
        cached = self._plan_weights.get(key)
        if cached is not None:
            return cached
        resident_quantized = any(weight_level(a.wq) != DTYPE for a in self.attn) or any(
            weight_level(f.wg) != DTYPE for f in self.ffn)
        if not resident_quantized and (not isinstance(mask, Plan) or not mask.is_quantized):
            out = (self.attn, self.ffn)
        else:
            mask = Plan.of(mask)
            if mask not in self._validated:
                mask.validate(self.view.shape)
                self._validated.add(mask)
            attn = [self._block_at(self.attn[i], "attn", i, lv) for i, lv in enumerate(mask.attn_levels)]
            ffn = [self._block_at(self.ffn[i], "ffn", i, lv) for i, lv in enumerate(mask.ffn_levels)]
            out = (attn, ffn)
        self._plan_weights[key] = out
        return out

    def _block_at(self, w: AttnWeights | FfnWeights, kind: str, layer: int, level: str):
        resident = weight_level(w.wq if kind == "attn" else w.wg)
        if level == DROP or level == resident:
            return w
        name = f"{kind}.{layer}"
        if resident != DTYPE:
            raise RequestError(f"{name} is resident at {resident}, the plan runs it at {level}: move it first "
                               "(rap.serve.residency.WeightResidency.apply(plan))")
        key = (name, level)
        if key not in self._quantized:
            fields = ("wqkv", "wq", "wk", "wv", "wo") if kind == "attn" else ("wgu", "wg", "wu", "wd")
            fused = "wqkv" if kind == "attn" else "wgu"
            skip = ("wq", "wk", "wv") if kind == "attn" else ("wg", "wu")
            new = {}
            for f in fields:
                t = getattr(w, f)
                if t is None or (f in skip and getattr(w, fused) is not None):
                    continue  # the fused tensor carries these rows
                new[f] = quantize_weight(t, level, f"{name}.{f}")
                self.extra_weight_bytes += storage_bytes(new[f])
            self._quantized[key] = replace(w, **new)
        return self._quantized[key]

    def forget_weights(self) -> None:
        """Let go of every weight tensor this decoder references (per-layer weights, quantized copies),
        so a module's replaced weight is freed at once; `refresh_weights` must run before the next call."""
        for w in (*self.attn, *self.ffn):
            for f in ("wq", "wk", "wv", "wo", "wqkv", "wg", "wu", "wd", "wgu"):
                if hasattr(w, f):
                    setattr(w, f, None)
        self.head_w = None
        self._quantized.clear()
        self._plan_weights.clear()
        self.extra_weight_bytes = 0

    def refresh_weights(self) -> None:
        """Re-read every block's weights from the model's modules (after a residency move replaced
        a module's weight with a quantized one, or back) and forget derived copies."""
        self.attn = [self._attn_weights(i) for i in range(self.view.num_layers)]
        self.ffn = [self._ffn_weights(i) for i in range(self.view.num_layers)]
        self.head_w = head_weights(self.view)
        self._quantized.clear()
        self._plan_weights.clear()
        self.extra_weight_bytes = 0
        if self.fuse_projections != "none":
            self._fuse(in_place=self.fuse_projections == "inplace")

    # ---- memory -------------------------------------------------------------------------------------
    def _rope_table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [R, T, D] (one table per RoPE kind) from the model's own rotary module."""
        if length not in self._rope_tables:
            self._rope_tables[length] = rope_tables(self.view, length, self.rope_kinds)
        return self._rope_tables[length]

    def _free_device_bytes(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def _smallest_window(self, mask: BlockMask | None = None) -> int | None:
        """The smallest sliding window among (kept) attention layers, or None (no windowed layer)."""
        windows = [a.window for i, a in enumerate(self.attn)
                   if a.window is not None and (mask is None or mask.keep_attn[i])]
        return min(windows) if windows else None

    @property
    def compresses_kv(self) -> bool:
        """Can every request take a KV keep ratio < 1? Not with sliding-window layers: the window is
        counted in true positions, which compressed cache columns no longer are (such a model takes
        a ratio only for requests that fit inside its window)."""
        return self._smallest_window() is None

    def _kv_length(self, prompt: int, length: int, kv_ratio: float) -> int:
        """Cache columns for a request of `prompt` tokens in a `length`-column bucket: the memory model's
        count for the request the engine plans with (rap.serve.backends.DecoderBackend.planning_request)."""
        if kv_ratio >= 1.0:
            return length
        return self.memory.kv_tokens(Request(1, max(1, prompt), max(1, length - prompt)), kv_ratio)

    def _check_fits(self, mask: BlockMask, batch: int, prompt: int, length: int, new_layers: Sequence[int],
                    kv_ratio: float = 1.0, layout: KVLayout | None = None) -> None:
        request = Request(batch, max(1, prompt), max(1, length - prompt))
        if self.budget_bytes is not None and not self.memory.fits(self.budget_bytes, mask, request, kv_ratio, layout):
            need = self.memory.peak_bytes(mask, request, kv_ratio, layout)
            raise BudgetError(f"batch {batch} x {length} tokens under [{mask}] needs {format_bytes(need)} "
                              f"(memory model), over the budget of {format_bytes(self.budget_bytes)}: "
                              "use a smaller batch, fewer tokens or drop more blocks")
        if self.device.type != "cuda":
            return
        layer_bytes = self.memory.kv_layer_bytes(request, mask, kv_ratio, layout)  # the mask's own pyramid
        need = sum(layer_bytes[i] for i in new_layers) + max(
            self.memory.prefill_activation_bytes(request, mask), self.memory.decode_activation_bytes(request, mask))
        free = self._free_device_bytes()
        if need > free:
            raise BudgetError(f"the KV cache for batch {batch} x {length} tokens under [{mask}] plus activations "
                              f"needs {format_bytes(need)}, only {format_bytes(free)} is free on {self.device}: "
                              "use a smaller batch, fewer tokens or drop more attention blocks")

    @staticmethod
    def _flat_layout(kv_ratio: float, kv_press: str | None, kv_bits: int | None,
                     kv_scorer: SnapKVScorer | None = None) -> KVLayout | None:
        """The flat layout a request needs (Ada-KV / PyramidKV below ratio 1, int8 / int4 KV), or None (dense)."""
        layout = layout_for(kv_press, kv_bits, (kv_scorer or DEFAULT_SCORER).window)
        return layout if layout.flat and (kv_ratio < 1.0 or layout.bits != 16) else None

    def _layer_lengths(self, mask: BlockMask, prompt: int, length: int, kv_ratio: float,
                       layout: KVLayout | None) -> dict[int, int] | None:
        """PyramidKV: each layer's cache length (`MemoryModel.kv_layer_tokens`); else None (one length)."""
        request = Request(1, max(1, prompt), max(1, length - prompt))
        return self.memory.kv_layer_tokens(request, mask, kv_ratio, layout) if layout and layout.pyramid else None

    def _workspace(self, batch: int, length: int, rope_length: int | None = None,
                   layout: KVLayout | None = None, layer_lengths: dict[int, int] | None = None) -> Workspace:
        rope_length = rope_length or length
        key = (batch, length, rope_length, None if layout is None else layout.bits,
               None if layer_lengths is None else tuple(sorted(layer_lengths.items())))
        if key not in self._workspaces:
            cos, sin = self._rope_table(rope_length)
            self._workspaces[key] = Workspace.allocate(batch, length, rope_length, cos, sin, self.view.shape.vocab_size,
                                                       self.device, layout, layer_lengths)
        return self._workspaces[key]

    def _ensure_kv(self, ws: Workspace, mask: BlockMask, prompt: int, kv_ratio: float = 1.0) -> None:
        new = [i for i in mask.kept_attn_layers if i not in ws.kv]
        if not new:
            return
        self._check_fits(mask, ws.batch, prompt, ws.rope_length, new, kv_ratio, ws.layout)
        s = self.view.shape
        ws.add_kv(new, s.num_kv_heads, s.head_dim, self.dtype, self.device)

    @property
    def kv_resident_bytes(self) -> int:
        return sum(ws.kv_bytes for ws in self._workspaces.values())

    def release(self) -> None:
        """Drop every captured graph and cache buffer (the next request captures again)."""
        self._workspaces.clear()
        self._rope_tables.clear()
        if self.use_graphs:
            torch.cuda.synchronize(self.device)
            self._pool = torch.cuda.graph_pool_handle()
            torch.cuda.empty_cache()

    def cached_graphs(self) -> list[tuple[BlockMask, int, int, bool]]:
        return [(m, ws.batch, ws.length, sampled) for ws in self._workspaces.values() for (m, sampled) in ws.graphs]

    def _embed(self, ids: torch.Tensor, mask: BlockMask | None = None) -> torch.Tensor:
        return self.head_for(mask).embed(ids)

    def head_for(self, mask: BlockMask | None) -> HeadWeights:
        """The embedding / norm / lm_head a plan runs: its int8 head as the int8 kernel's tensor. A head
        resident at dtype that the plan wants int8 is quantized once and cached (in `extra_weight_bytes`:
        the dense copy stays; `rap.serve.residency` moves the head itself to free it)."""
        level = getattr(mask, "head_level", DTYPE)
        if level == self.head_w.level:
            return self.head_w
        key = ("head", level)
        if key not in self._quantized:
            self._quantized[key] = self.head_w.at(level, fake=False)
            self.extra_weight_bytes += storage_bytes(self._quantized[key].embed_w)
            if self._quantized[key].lm_w is not self._quantized[key].embed_w:
                self.extra_weight_bytes += storage_bytes(self._quantized[key].lm_w)
        return self._quantized[key]


    # ---- the decode step and its graphs (rap.decode.step, rap.decode.graphs) ----------------------------

    def prepare(self, mask: BlockMask, batch: int, max_len: int, sampled: bool = False, prompt: int = 1,
                kv_ratio: float = 1.0, kv_press: str | None = None, kv_bits: int | None = None,
                kv_scorer: SnapKVScorer | None = None) -> float:
        """Make sure (mask, batch bucket, cache length) has its cache and, on CUDA, its captured graph.

        max_len: prompt + new tokens; with kv_ratio < 1 the cache holds the compressed length.
        Returns the milliseconds spent (≈0 when cached: switching masks is a dictionary lookup).
        """
        t0 = time.perf_counter()
        T = bucket_length(max_len)
        layout = self._flat_layout(kv_ratio, kv_press, kv_bits, kv_scorer)
        ws = self._workspace(bucket_batch(batch), self._kv_length(prompt, T, kv_ratio), T, layout,
                             self._layer_lengths(mask, prompt, T, kv_ratio, layout))
        self._ensure_kv(ws, mask, prompt, kv_ratio)
        if self.use_graphs and (mask, sampled) not in ws.graphs:
            ws.graphs[(mask, sampled)] = capture(self, ws, mask, sampled)
        self.last_prepare_ms = (time.perf_counter() - t0) * 1e3
        return self.last_prepare_ms

    # ---- prefill (rap.decode.prefill) ---------------------------------------------------------------------
    def _prefill(self, ws: Workspace, mask: BlockMask, ids: torch.Tensor, pad: torch.Tensor,
                 plan: KeepPlan | None = None) -> torch.Tensor:
        """ids [n, P] left-padded; writes K/V of columns [0, P) for rows [0, n) (with a plan, the kept
        columns [0, plan.width)); returns logits [n, V]. A method so a caller may replay it (rap.eval.needle_decoder)."""
        return prefill(self, ws, mask, ids, pad, plan)

    # ---- the public call --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, mask: BlockMask | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | Sequence[int | None] | None = None,
                 stop_token_ids: Sequence[int] | int | None = None, pad_token_id: int | None = None,
                 kv_ratio: float = 1.0, on_step: Callable[[torch.Tensor], Sequence[bool] | None] | None = None,
                 kv_press: str | None = None, kv_bits: int | None = None,
                 kv_scorer: SnapKVScorer | None = None) -> Generation:
        """Generate up to `max_new_tokens` per prompt under `mask` (default: the view's current mask).

        prompts: token id lists of any lengths (left-padded internally). temperature 0 = greedy.
        stop_token_ids: a row stops after emitting one of these (default: none). kv_ratio in (0, 1]:
        the share of each prompt's tokens every kept attention layer keeps per KV head (SnapKV, see
        the module docstring; 1.0 keeps all, exactly as before). kv_press: "adakv" (default: per
        layer, the row's Hkv * k tokens split over KV heads by Ada-KV, in a flat cache), "snapkv"
        (k per head, dense buffers), "pyramidkv" (PyramidKV's per-layer budgets, falling with depth and
        averaging k, uniform over heads, flat cache) or "ada-pyramidkv" (those budgets split by
        Ada-KV). kv_bits: 16 (the model's dtype, default), 8 (int8 keys and values, flat cache) or 4
        (int4, two per byte, flat cache; head_dim must be even).
        kv_scorer: the SnapKV scorer's parameters (default `rap.kv.scorer.DEFAULT_SCORER`). on_step:
        called with the [n] new tokens (CPU tensor) after prefill and after every decode step; rows
        that stopped repeat the pad token; it may return [n] booleans, rows to finish now (a stop
        string matched, a client gone), which then stop like a stop token (the loop ends when every
        row has). seed: one for the batch, or one per row (None: random), each row then drawing its
        noise from its own generator, so its tokens do not depend on what it is batched with.
        Returns the new tokens per prompt (up to and including its stop token) and the timing.
        """
        mask = mask or self.view.mask
        if mask.num_layers != self.view.num_layers:
            raise RequestError(f"mask has {mask.num_layers} layers, the model has {self.view.num_layers}")
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RequestError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise RequestError("temperature must be >= 0 and top_p in (0, 1]")
        if not 0.0 < kv_ratio <= 1.0:
            raise RequestError(f"kv_ratio must be in (0, 1], got {kv_ratio}")
        stops = [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids or [])
        if len(stops) > MAX_STOP_IDS:
            raise RequestError(f"at most {MAX_STOP_IDS} stop token ids")
        V = self.view.shape.vocab_size
        if any(t < 0 or t >= V for p in prompts for t in p):
            raise RequestError(f"prompt token ids must be in [0, {V})")
        pad_id = pad_token_id if pad_token_id is not None else (self.pad_token_id if self.pad_token_id is not None
                                                               else (stops[0] if stops else 0))
        sampled = temperature > 0
        n, P = len(prompts), max(len(p) for p in prompts)
        kv = layout_for(kv_press, kv_bits)  # RequestError for an unknown press or unsupported bits
        check_head_dim(self.view.shape.head_dim, kv.bits)  # int4 packs along head_dim: refused before any work
        scorer = kv_scorer or DEFAULT_SCORER
        layout = self._flat_layout(kv_ratio, kv_press, kv_bits, scorer)
        window = self._smallest_window(mask)
        if (kv_ratio < 1.0 or layout is not None) and window is not None and P + max_new_tokens > window:
            windowed = [i for i, a in enumerate(self.attn) if a.window is not None and mask.keep_attn[i]]
            raise RequestError(f"KV compression ({kv.press} at ratio {kv_ratio:g}, {kv.bits}-bit) cannot run on the "
                               f"sliding-window attention layers {windowed} ({window} tokens) once prompt + new tokens "
                               f"({P + max_new_tokens}) exceed the window: use kv_ratio 1.0 and 16-bit KV")
        lengths = [len(p) for p in prompts]
        kept = [max(1, math.ceil(kv_ratio * L)) if kv_ratio < 1.0 else L for L in lengths]
        compress = kept != lengths
        K = max(kept)  # first decode column (= P without compression)
        capture_ms = 0.0
        B, T = bucket_batch(n), bucket_length(P + max_new_tokens)
        ws = self._workspace(B, self._kv_length(P, T, kv_ratio), T, layout,
                             self._layer_lengths(mask, P, T, kv_ratio, layout))
        if self.use_graphs:
            cached = (mask, sampled) in ws.graphs and all(i in ws.kv for i in mask.kept_attn_layers)
            spent = self.prepare(mask, n, P + max_new_tokens, sampled, prompt=P, kv_ratio=kv_ratio,
                                 kv_press=kv_press, kv_bits=kv_bits, kv_scorer=kv_scorer)
            capture_ms = 0.0 if cached else spent
        else:
            self._ensure_kv(ws, mask, P, kv_ratio)
        gens = row_generators(seed, self.device) if sampled else []

        def finish_rows(finished) -> None:
            if finished is not None:
                ws.done[:n] |= torch.as_tensor(list(finished), dtype=torch.bool).to(dev)

        # request state
        dev = self.device
        ids = torch.full((n, P), pad_id, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, P - len(p):] = torch.tensor(p)
        prompt_pad = torch.tensor([P - L for L in lengths]).to(dev)
        pad = torch.full((B,), K - 1, dtype=torch.long)  # idle bucket rows see one column
        pad[:n] = torch.tensor([K - k for k in kept])
        shift = torch.zeros(B, dtype=torch.long)
        shift[:n] = torch.tensor([L - k for L, k in zip(lengths, kept)])
        kept_dev = torch.tensor(kept).to(dev)
        plan = KeepPlan(prompt_pad, kept_dev, K, scorer) if compress else None
        if layout is not None:  # flat cache: every head of row b gets T - k_b rows to decode into
            plan = KeepPlan(prompt_pad, kept_dev, K, scorer, adaptive=layout.adaptive,
                            reserve=ws.length - kept_dev, everything=not compress)
            if layout.pyramid and compress:
                plan = pyramid_plan(plan, {i: ws.layer_length(i) for i in mask.kept_attn_layers}, mask.num_layers,
                                    layout, lengths, kept, max_new_tokens)
            for i in mask.kept_attn_layers:
                ws.kv[i].reset()
        ws.pad.copy_(pad)
        ws.shift.copy_(shift)
        ws.col.fill_(K)
        ws.stop.fill_(-1)
        if stops:
            ws.stop[:len(stops)] = torch.tensor(stops, device=dev)
        ws.pad_id.fill_(pad_id)
        ws.temperature.fill_(temperature if sampled else 1.0)
        ws.top_p.fill_(top_p)
        ws.out.fill_(pad_id)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda *a: None)

        sync(dev)
        t0 = time.perf_counter()
        logits = self._prefill(ws, mask, ids.to(dev), prompt_pad, plan)
        if sampled:
            draw_noise(ws, gens, n)
        first = pick_tokens(logits, ws.temperature, ws.top_p, ws.noise[:n] if sampled else None)
        ws.tokens.fill_(pad_id)
        ws.tokens[:n] = first
        ws.out[:, K] = ws.tokens
        ws.done.fill_(True)
        ws.done[:n] = (first[:, None] == ws.stop[None, :]).any(-1)
        if on_step is not None:
            finish_rows(on_step(first.to("cpu", copy=True)))
        sync(dev)
        t1 = time.perf_counter()

        steps = 0
        graph = ws.graphs.get((mask, sampled)) if self.use_graphs else None
        every = self.check_every if graph is not None and on_step is None else 1
        for _ in range(max_new_tokens - 1):
            if steps % every == 0 and bool(ws.done.all()):
                break
            if sampled:
                draw_noise(ws, gens, ws.batch)
            if graph is not None:
                graph.replay()
            elif self.step == "static":
                static_step(self, ws, mask, sampled)
            else:
                exact_step(self, ws, mask, sampled, n)
            steps += 1
            if on_step is not None:  # the one host sync per step streaming (and cancelling) costs
                finish_rows(on_step(ws.tokens[:n].to("cpu", copy=True)))
        sync(dev)
        t2 = time.perf_counter()

        out = ws.out[:n, K:K + 1 + steps].tolist()
        stopset = set(stops)
        tokens = []
        for row in out:
            cut = next((j + 1 for j, t in enumerate(row) if t in stopset), len(row))
            tokens.append(row[:cut])
        timing = Timing(prefill_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3, decode_steps=steps, rows=n,
                        capture_ms=capture_ms, graph=graph is not None)
        return Generation(tokens=tokens, timing=timing, mask=mask, kv_ratio=kv_ratio,
                          kv_press=kv.press if compress else None, kv_bits=kv.bits)
