"""One captured CUDA graph per (plan, batch bucket, cache length, greedy/sampled): the decode step replayed.

On CUDA the decode step (`rap.decode.step.static_step`: embedding -> kept blocks -> norm -> lm_head ->
pick -> stop bookkeeping, all on the device) is captured once and cached in its workspace: a dropped
block is simply absent from the graph, so every byte a mask drops is time saved, and switching back
to a mask seen before is a dictionary lookup. The compiled unit is one block function, shared by all
layers and masks, so a new mask costs a capture (~50 ms), not a compile.
Each function takes the `rap.decode.decoder.Decoder` as `dec` (its weights, head and settings).
"""

from __future__ import annotations

import logging

import torch

from rap.core.layers import attn_decode_static, ffn_block, final_logits
from rap.core.mask import BlockMask
from rap.decode.step import static_step
from rap.decode.workspace import Workspace

log = logging.getLogger(__name__)

_CAPTURE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def capture_stream(device: torch.device) -> "torch.cuda.Stream":
    """The one side stream on which every Decoder of the process warms up and captures its graphs.

    cuBLAS keeps a workspace per stream it has run on (32 MiB on Hopper, in PyTorch's caching
    allocator, never freed). A new stream per capture for the warm-up plus torch.cuda.graph's own
    capture stream left one more workspace allocated per captured graph (+33.5 MB each, measured on
    the H100); with this stream the process holds two, the current stream's and this one's, which is
    what rap.core.memory counts.
    """
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


_COMPILED: tuple | None = None


def compiled_block_functions() -> tuple:
    """torch.compile'd block functions, shared by every Decoder (one compile per shape, not per layer:
    weights are arguments, so all layers of a model hit the same compiled code)."""
    global _COMPILED
    if _COMPILED is None:
        import torch._dynamo

        cfg = torch._dynamo.config
        limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, limit, max(getattr(cfg, limit), 64))
        opts = dict(fullgraph=True, dynamic=False)
        _COMPILED = tuple(torch.compile(f, **opts) for f in (attn_decode_static, ffn_block, final_logits))
    return _COMPILED


def capture(dec, ws: Workspace, mask: BlockMask, sampled: bool) -> "torch.cuda.CUDAGraph":
    """Warm up (compiling, if asked) and capture `static_step` for (mask, sampled) on `ws`, on the side stream."""
    ws.col.zero_()
    ws.done.fill_(True)
    side = capture_stream(dec.device)
    side.wait_stream(torch.cuda.current_stream(dec.device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):  # warm-up: compiles (if asked) and initialises cuBLAS outside the capture
            static_step(dec, ws, mask, sampled)
    torch.cuda.current_stream(dec.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=dec._pool, stream=side), torch.no_grad():
        static_step(dec, ws, mask, sampled)
    graph.replay()  # the first replay uploads the graph; keep that out of the first request
    torch.cuda.synchronize(dec.device)
    log.info("captured decode graph for [%s] batch %d length %d", mask, ws.batch, ws.length)
    return graph
