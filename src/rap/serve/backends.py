"""Generation backends: rap's decoder (the fast path) and Hugging Face `generate` (the fallback and
the reference), behind one `generate(view, prompts, mask, kv_ratio, sampling, ...)` signature.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from rap.errors import RapError
from rap.core.hf import BaseStreamer
from rap.core.mask import BlockMask
from rap.core.memory import Request
from rap.core.model import BlockView

log = logging.getLogger(__name__)

# Below this temperature sampling is greedy, as in vLLM: 1/T overflows the logits to inf and the
# probabilities to NaN long before T reaches 0, and the distribution is one-hot anyway.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen; requests batch together when temperature and top_p match."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


class HFGenerateBackend:
    """Hugging Face `generate` under the block mask (dynamic cache; a dropped attention block caches
    nothing). Slow but available for every supported family, and it streams token by token."""

    name = "hf-generate"
    supports_kv_ratio = False
    streams = True

    def planning_request(self, request: Request) -> Request:
        return request

    def on_weights_restored(self, names: Sequence[str]) -> None:
        pass

    def resident_extra_bytes(self) -> int:
        return 0

    def generate(self, view: BlockView, prompts: list[list[int]], mask: BlockMask, kv_ratio: float,
                 sampling: Sampling, max_new_tokens: int, pad_token_id: int, eos_token_ids: Sequence[int],
                 on_step: Callable[[torch.Tensor], Any] | None = None,
                 seeds: Sequence[int | None] | None = None, kv_press: str | None = None,
                 kv_bits: int = 16) -> list[list[int]]:
        """New token ids per prompt (rows that stop early are padded); prompts are left-padded.
        `on_step` may return which rows are finished (a stop string, a cancel): `generate` stops
        them. Sampled rows with seeds run one by one (one global generator here), so a row's
        tokens depend on its seed only, not on what it was batched with. kv_press / kv_bits are
        ignored: this backend never compresses (supports_kv_ratio is False)."""
        seeds = list(seeds) if seeds is not None else [sampling.seed] * len(prompts)
        if not sampling.greedy and len(prompts) > 1 and any(s is not None for s in seeds):
            out: list[list[int]] = []
            for row, (p, seed) in enumerate(zip(prompts, seeds)):
                def row_step(tokens, row=row, n=len(prompts)):
                    full = torch.full((n,), -1, dtype=tokens.dtype)  # -1: no token for that row this step
                    full[row] = tokens[0]
                    finished = on_step(full)
                    return None if finished is None else [finished[row]]
                out += self.generate(view, [p], mask, kv_ratio, sampling, max_new_tokens, pad_token_id, eos_token_ids,
                                     row_step if on_step is not None else None, [seed])
            return out
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=view.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=view.device)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not sampling.greedy,
                                  pad_token_id=pad_token_id, eos_token_id=list(eos_token_ids))
        if not sampling.greedy:
            config.temperature, config.top_p, config.top_k = sampling.temperature, sampling.top_p, 0
        seed = seeds[0] if seeds else None
        if seed is not None:
            torch.manual_seed(seed % 2**64)
        finished: list = [None]

        class RowsFinished(StoppingCriteria):  # what on_step said, as generate's per-row stop
            def __call__(self, input_ids, scores, **kwargs):
                done = finished[0]
                if done is None:
                    return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

        def step(tokens):
            finished[0] = on_step(tokens)

        streamer = _StepStreamer(step) if on_step is not None else None
        criteria = StoppingCriteriaList([RowsFinished()]) if on_step is not None else None
        with view.masked(mask), torch.inference_mode():
            out = view.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                      streamer=streamer, stopping_criteria=criteria)
        return out[:, width:].tolist()


class _StepStreamer(BaseStreamer):
    """transformers streamer protocol: put(prompt ids) once, then put(new ids [batch]) per step."""

    def __init__(self, on_step: Callable[[torch.Tensor], None]):
        super().__init__()
        self.on_step = on_step
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.on_step(value.reshape(-1).cpu())

    def end(self) -> None:
        pass


class DecoderBackend:
    """rap.decode.decoder.Decoder (static cache for kept attention blocks, CUDA graphs per mask).

    Two things tie it to weight residency: its captured graphs hold the addresses of the weights,
    so when blocks come back to the device (at new addresses) every graph and cache buffer is
    released and recaptured on demand; and it keeps KV buffers sized by (batch bucket, rounded
    length) between calls, so the engine plans with that rounded request and counts the buffers
    it still holds. Only arguments its `generate` accepts are passed: a decoder with `kv_ratio`
    compresses the KV cache (dense buffers whose compressed length it rounds up to
    `kv_length_quantum` tokens, which the engine's memory model then plans with; not for models
    with sliding-window layers), one with `on_step` streams.
    """

    name = "rap-decode"

    def __init__(self, view: BlockView, decoder_cls: type, module: Any):
        self.decoder = decoder_cls(view)
        self.module = module
        self._stale = False
        self._accepts = set(inspect.signature(self.decoder.generate).parameters)
        self.supports_kv_ratio = "kv_ratio" in self._accepts and bool(getattr(self.decoder, "compresses_kv", True))
        self.kv_length_quantum = getattr(module, "LENGTH_QUANTUM", None) if self.supports_kv_ratio else None
        self.kv_layout = None
        if self.supports_kv_ratio and "kv_press" in self._accepts:
            from rap.kv.decode_cache import KVLayout

            self.kv_layout = KVLayout("adakv")  # what the decoder runs below ratio 1 (a request may ask snapkv)
        self.streams = "on_step" in self._accepts  # else tokens come back at the end of the batch
        self.window_bounded_kv = bool(getattr(getattr(self.decoder, "memory", None), "window_bounded_kv", True))

    def planning_request(self, request: Request) -> Request:
        from rap.decode.workspace import planning_request  # the one function (the benchmarks use it too)

        return planning_request(request)

    def on_weights_restored(self, names: Sequence[str]) -> None:
        if names or self._stale:
            self.decoder.release()
            getattr(self.decoder, "refresh_weights", lambda: None)()
            self._stale = False

    def drop_weight_references(self) -> None:
        """Release graphs and per-layer weight references before blocks change precision (see
        rap.serve.residency); `on_weights_restored` re-reads the modules' weights afterwards."""
        self.decoder.release()
        getattr(self.decoder, "forget_weights", lambda: None)()
        self._stale = True

    def resident_extra_bytes(self) -> int:
        return int(getattr(self.decoder, "kv_resident_bytes", 0))

    def release(self) -> None:
        self.decoder.release()

    def windowed_layers(self) -> list[int]:
        """Attention layers with a sliding window (which a compressed KV cache cannot serve)."""
        return [i for i, a in enumerate(getattr(self.decoder, "attn", [])) if getattr(a, "window", None) is not None]

    def generate(self, view, prompts, mask, kv_ratio, sampling, max_new_tokens, pad_token_id, eos_token_ids,
                 on_step=None, seeds=None, kv_press: str | None = None, kv_bits: int = 16) -> list[list[int]]:
        # one seed per row when any row has one (each row its own generator), else one random generator
        seed = list(seeds) if seeds is not None and any(s is not None for s in seeds) else sampling.seed
        offered = dict(prompts=prompts, max_new_tokens=max_new_tokens, mask=mask, kv_ratio=kv_ratio,
                       temperature=sampling.temperature, top_p=sampling.top_p, seed=seed,
                       stop_token_ids=list(eos_token_ids), pad_token_id=pad_token_id, on_step=on_step,
                       kv_press=kv_press, kv_bits=kv_bits)
        out = self.decoder.generate(**{k: v for k, v in offered.items() if k in self._accepts})
        return [list(row) for row in getattr(out, "tokens", out)]


def make_backend(view: BlockView, backend: str = "auto"):
    """"auto": rap.decode.decoder.Decoder when it supports the model, else HF generate (said in the log);
    "hf" or "decoder" to force one."""
    if backend == "hf":
        return HFGenerateBackend()
    import rap.decode.decoder as decode

    try:
        return DecoderBackend(view, decode.Decoder, decode)
    except RapError as e:  # a family or RoPE the decoder does not implement: the slow path still serves
        if backend == "decoder":
            raise RapError(f"rap.decode.decoder.Decoder is not usable here: {e}") from None
        log.warning("rap.decode.decoder.Decoder unavailable (%s); using Hugging Face generate", e)
        return HFGenerateBackend()
