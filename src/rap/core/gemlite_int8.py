"""The int8 level's CUDA kernel: gemlite's Triton A16W8 GEMV/GEMM, behind a torchao tensor subclass.

Why not torchao's own `Int8Tensor` on CUDA: its weight-only linear casts the whole int8 matrix to
bf16 on every call. On the H200 that ran at 0.16-0.18x bf16 per linear and 0.10x in rap's decoder,
and PyTorch's `_weight_int8pack_mm` ran at 0.01-0.11x. gemlite's A16W8 ran at 1.23-1.49x bf16 at
batch 1 on the Llama-2-7B linears (`benchmarks/int8_kernels.py`,
`benchmarks/results/int8-kernels-h200-2026-12-02.json`). gemlite (mobiusml, Apache-2.0) is a
maintained kernel library, and its entry point is a `torch.library` custom op, so it compiles and
captures in CUDA graphs.

The tensor holds the same int8 values and fp32 per-output-channel scales that `rap.core.quant`
chooses for `Int8Tensor` (so CPU and CUDA plans hold the same values). `F.linear(x, w)` dispatches
to `gemlite::forward_functional`, and `storage_bytes` reads the inner tensors as for any torchao tensor.
"""

from __future__ import annotations

import functools

import torch
from torchao.utils import TorchAOBaseTensor

aten = torch.ops.aten


@functools.cache
def available() -> bool:
    """Whether gemlite can be imported (the `cuda` extra). Asked once: the memory model asks per weight."""
    try:
        import gemlite  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: not available
        return False
    return True


class GemliteInt8Tensor(TorchAOBaseTensor):
    """An [N, K] weight as int8 values [N, K], fp32 scales [N] and gemlite's kernel arguments."""

    tensor_data_names = ["qdata", "scale", "zeros", "meta_scale"]
    tensor_attribute_names = ["meta_args", "dtype"]

    def __new__(cls, qdata, scale, zeros, meta_scale, meta_args, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, qdata.shape, device=qdata.device, dtype=dtype,
                                                   requires_grad=False)

    def __init__(self, qdata, scale, zeros, meta_scale, meta_args, dtype):
        super().__init__()
        self.qdata, self.scale, self.zeros, self.meta_scale = qdata, scale, zeros, meta_scale
        self.meta_args = list(meta_args)

    @classmethod
    def from_int8(cls, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> "GemliteInt8Tensor":
        """From int8 values [N, K] and per-row scales (any shape with N elements), on a CUDA device."""
        from gemlite.helper import A16W8_INT8

        N = qdata.shape[0]
        layer = A16W8_INT8(device=str(qdata.device), dtype=dtype).from_weights(
            qdata.contiguous(), scales=scale.reshape(N, 1).to(torch.float32))
        args = layer.get_tensor_args()
        # gemlite keeps W_q as the transposed view of our [N, K] values; keep the [N, K] tensor itself
        assert args[0].data_ptr() == qdata.contiguous().data_ptr() or args[0].t().is_contiguous()
        return cls(args[0].t(), args[1].reshape(N), args[2], args[3], layer.get_meta_args(), dtype)

    def kernel_args(self) -> list[torch.Tensor]:
        return [self.qdata.t(), self.scale.reshape(1, -1), self.zeros, self.meta_scale]

    def dequantize(self) -> torch.Tensor:
        return (self.qdata.to(torch.float32) * self.scale.reshape(-1, 1)).to(self.dtype)


implements = GemliteInt8Tensor.implements
implements_torch_function = GemliteInt8Tensor.implements_torch_function


@implements(aten.linear.default)
@implements_torch_function(torch.nn.functional.linear)
def _(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return torch.ops.gemlite.forward_functional(x, bias, w.kernel_args(), w.meta_args, -1)


def _gather(ids: torch.Tensor, w: GemliteInt8Tensor) -> torch.Tensor:
    """Rows `ids` of the weight, dequantized (an int8 head's embedding lookup)."""
    return (w.qdata[ids].to(torch.float32) * w.scale[ids][..., None]).to(w.dtype)


@implements_torch_function(torch.nn.functional.embedding)
def _(func, types, args, kwargs):
    return _gather(args[0], args[1])


@implements(aten.embedding.default)
def _(func, types, args, kwargs):
    return _gather(args[1], args[0])
