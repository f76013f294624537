"""Weight-only quantized linear weights for a plan's int8 / int4 blocks, from torchao.

Each quantized weight is a torchao tensor subclass that `F.linear` dispatches on, so rap's layer
math (`rap.decode.decoder`) is the same for every level; only the weight objects differ:

* ``int8``: `torchao.quantization.Int8Tensor` (what `Int8WeightOnlyConfig` builds): int8 values
  [N, K], a symmetric fp32 scale and an int8 zero point (always 0) per output channel. Same on
  CPU and CUDA; its linear is ``(x @ q.T.to(x.dtype)) * scale`` (Inductor fuses the cast into the
  matmul when the decoder compiles its blocks on CUDA).
* ``int4g<G>``: tinygemm's asymmetric group-wise int4 (values 0..15, a scale and a float zero per
  G input features): on CUDA torchao's `Int4TilePackedTo4dTensor` (`Int4WeightOnlyConfig`'s
  tile_packed_to_4d format; kernel `aten._weight_int4pack_mm`, bf16 only; pads K to a multiple of
  1024 and N to a multiple of 8), on CPU torchao's `Int4OpaqueTensor` (prototype; kernel
  `aten._weight_int4pack_mm_for_cpu`, fp32/bf16/fp16). Both are real int4 kernels, not a
  dequantize-then-matmul reference.

The scales and zeros are chosen here, once, by torchao's own tinygemm primitives with the same
arguments for both devices (torchao's two from_hp methods differ in eps and scale dtype), so a
plan holds the same quantized values on CPU and on CUDA; only the packing differs.
`fake_quantize` returns those values dequantized as a dense tensor: the reference a test builds a
plain transformers model from.

`storage_bytes(tensor)` is what a (quantized) tensor really holds; `quantized_weight_bytes` predicts
it from the shape alone for the memory model, per device type, to the byte.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from rap.core.plan import INT8, PlanError, int4_group_size

INT4_CUDA_K_MULTIPLE = 1024  # Int4TilePackedTo4dTensor pads in_features to this
INT4_CUDA_N_MULTIPLE = 8  # ... and out_features to its ntile (8 on CUDA)
INT4_EPS = 1e-6


def _tinygemm_qparams(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int32 values [N, K] in 0..15, scale and zero [N, K / group] in w's dtype (tinygemm's float zero)."""
    from torchao.quantization.quant_primitives import (MappingType, _choose_qparams_affine_tinygemm,
                                                       _quantize_affine_tinygemm)

    block = [1, group]
    scale, zero = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, block, torch.int32, 0, 15, INT4_EPS,
                                                  w.dtype, w.dtype)
    values = _quantize_affine_tinygemm(w, block, scale, zero, torch.int32, 0, 15)
    return values, scale.reshape(w.shape[0], -1), zero.reshape(w.shape[0], -1)


INT8_KERNELS = ("gemlite", "torchao")
HEAD_CHUNK_ROWS = 4096  # vocabulary rows an int8 lm_head on torchao's Int8Tensor computes at once (rap.core.layers)
_warned_int8 = False


def int8_kernel(device_type: str) -> str:
    """Which kernel the int8 level runs on this device type: "gemlite" (CUDA, when installed: the `cuda`
    extra) or "torchao" (`Int8Tensor`: CPU, or CUDA without gemlite, at 0.1-0.2x bf16's speed there).
    `RAP_INT8_KERNEL=torchao` forces torchao; CUDA without gemlite says so once, in the log."""
    global _warned_int8
    if device_type != "cuda":
        return "torchao"
    choice = os.environ.get("RAP_INT8_KERNEL", "gemlite")
    if choice not in INT8_KERNELS:
        raise PlanError(f"RAP_INT8_KERNEL={choice!r}: expected one of {', '.join(INT8_KERNELS)}")
    if choice == "torchao":
        return "torchao"
    from rap.core.gemlite_int8 import available

    if available():
        return "gemlite"
    if not _warned_int8:
        logging.getLogger("rap").warning("int8 on CUDA: gemlite is not installed (pip install 'rap-runtime[cuda]'); "
                                         "using torchao's Int8Tensor, which runs at ~0.1-0.2x bf16's speed")
        _warned_int8 = True
    return "torchao"


def check_level_fits(w: torch.Tensor, level: str, name: str = "weight") -> None:
    group = int4_group_size(level)
    if group is not None and w.shape[-1] % group:
        raise PlanError(f"{name}: int4 group size {group} does not divide in_features {w.shape[-1]}")
    if group is not None and w.device.type == "cuda" and w.dtype != torch.bfloat16:
        raise PlanError(f"{name}: int4 on CUDA (tinygemm) needs bfloat16 weights, the model is {w.dtype}: "
                        "load it with --dtype bfloat16 or use int8")


@torch.no_grad()
def quantize_weight(w: torch.Tensor, level: str, name: str = "weight") -> torch.Tensor:
    """A dense [N, K] weight as the torchao tensor of `level` ("int8" or "int4g<G>"), on w's device."""
    w = w.detach()
    check_level_fits(w, level, name)
    if level == INT8:
        from torchao.quantization import Int8Tensor
        from torchao.quantization.granularity import PerRow

        t = Int8Tensor.from_hp(w, PerRow())
        if int8_kernel(w.device.type) == "gemlite":
            from rap.core.gemlite_int8 import GemliteInt8Tensor

            return GemliteInt8Tensor.from_int8(t.qdata, t.scale, w.dtype)
        return t
    group = int4_group_size(level)
    if group is None:
        raise PlanError(f"{name}: {level!r} is not a quantized level")
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    N, K = w.shape
    if w.device.type == "cuda":
        from torchao.quantization import Int4TilePackedTo4dTensor

        Np, Kp = _round_up(N, INT4_CUDA_N_MULTIPLE), _round_up(K, INT4_CUDA_K_MULTIPLE)
        values, scale, zero = _tinygemm_qparams(torch.nn.functional.pad(w, (0, Kp - K, 0, Np - N)), group)
        packed = (values[:, ::2] << 4 | values[:, 1::2]).to(torch.uint8)
        qdata = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), 8)
        return Int4TilePackedTo4dTensor(qdata, pack_tinygemm_scales_and_zeros(scale, zero, scale.dtype), [1, group],
                                        w.shape)
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

    values, scale, zero = _tinygemm_qparams(w, group)
    qdata = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    return Int4OpaqueTensor(qdata, pack_tinygemm_scales_and_zeros(scale, zero, scale.dtype), [1, group], w.shape)


@torch.no_grad()
def fake_quantize(w: torch.Tensor, level: str) -> torch.Tensor:
    """The values `quantize_weight(w, level)` holds, dequantized to a dense tensor of w's dtype
    (computed from torchao's quant primitives directly, not through the kernels' tensors)."""
    from torchao.quantization.quant_primitives import (MappingType, _dequantize_affine_tinygemm,
                                                       choose_qparams_affine, dequantize_affine, quantize_affine)

    w = w.detach()
    check_level_fits(w, level)
    if level == INT8:
        block = [1, w.shape[1]]
        scale, zero = choose_qparams_affine(w, MappingType.SYMMETRIC, block, torch.int8, -128, 127,
                                            eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32,
                                            zero_point_dtype=torch.int8, keepdim=True)
        q = quantize_affine(w, block, scale, zero, torch.int8, -128, 127)
        return dequantize_affine(q, block, scale, zero, torch.int8, output_dtype=w.dtype)
    group = int4_group_size(level)
    values, scale, zero = _tinygemm_qparams(w, group)
    return _dequantize_affine_tinygemm(values, [1, group], scale, zero, torch.int32, 0, 15, output_dtype=w.dtype)


def storage_bytes(t: torch.Tensor | None) -> int:
    """Bytes a tensor's storage really holds: a torchao subclass's inner tensors, else numel * size."""
    if t is None:
        return 0
    names = getattr(t, "tensor_data_names", None)
    if names is None:
        return t.numel() * t.element_size()
    inner = [*names, *getattr(t, "optional_tensor_data_names", [])]
    return sum(storage_bytes(getattr(t, n, None)) for n in inner)


def _round_up(n: int, m: int) -> int:
    return m * math.ceil(n / m)


def quantized_weight_bytes(out_features: int, in_features: int, level: str, dtype_bytes: int,
                           device_type: str = "cpu") -> int:
    """Bytes `quantize_weight` holds for an [out, in] weight at `level` (the dense dtype for others):

    * int8: N*K int8 values + N fp32 scales + N int8 zero points (torchao `Int8Tensor`), or on CUDA with
      gemlite N*K values + N fp32 scales + gemlite's fp32 meta scale (`rap.core.gemlite_int8`);
    * int4 on CPU (Int4OpaqueTensor): N*K/2 packed bytes + [K/G, N, 2] scales and zeros in the dtype;
    * int4 on CUDA (Int4TilePackedTo4dTensor): the same over the padded Np x Kp, in bf16.
    """
    N, K = out_features, in_features
    if level == INT8:
        return N * K + 4 * N + (4 if int8_kernel(device_type) == "gemlite" else N)
    group = int4_group_size(level)
    if group is None:
        return N * K * dtype_bytes
    if device_type == "cuda":
        N, K, dtype_bytes = _round_up(N, INT4_CUDA_N_MULTIPLE), _round_up(K, INT4_CUDA_K_MULTIPLE), 2
    return N * K // 2 + (K // group) * N * 2 * dtype_bytes


def dequantize_transient_bytes(out_features: int, in_features: int, level: str, dtype_bytes: int,
                               device_type: str = "cpu") -> int:
    """Bytes an eager linear with this weight allocates beyond its output: Int8Tensor's weight-only
    path casts the whole [K, N] int8 matrix to the activation dtype first; gemlite and tinygemm need nothing."""
    if level != INT8 or int8_kernel(device_type) == "gemlite":
        return 0
    return out_features * in_features * dtype_bytes


def weight_level(t: torch.Tensor | None) -> str:
    """The plan level a (module's) weight tensor is stored at: "int8", "int4g<G>" or "dtype"
    (an `nn.Parameter` wrapping a torchao tensor is that tensor's type)."""
    from rap.core.plan import DTYPE

    name = type(t).__name__
    if name in ("Int8Tensor", "GemliteInt8Tensor"):
        return INT8
    if name.startswith("Int4") and hasattr(t, "block_size"):
        return f"int4g{t.block_size[-1]}"
    return DTYPE


def block_linear_modules(module: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The nn.Linear children of a block module (q/k/v/o or gate/up/down), in definition order."""
    return [(n, m) for n, m in module.named_children() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def set_module_level(module: torch.nn.Module, level: str, name: str = "block",
                     weights: dict[str, torch.Tensor] | None = None) -> None:
    """Replace the weight of every linear of a block module by its `level` tensor, quantized from
    the module's current dense weight (or from `weights[proj]`, e.g. a dense host copy); "dtype"
    installs `weights[proj]` as they are. The old tensor's last reference goes, so it is freed."""
    for proj, lin in block_linear_modules(module):
        src = lin.weight if weights is None else weights[proj]
        new = src if level == "dtype" else quantize_weight(src, level, f"{name}.{proj}")
        lin.weight = torch.nn.Parameter(new, requires_grad=False)


def module_storage_bytes(module: torch.nn.Module) -> int:
    """Bytes a module's parameters really hold (torchao tensors by their inner storage)."""
    return sum(storage_bytes(p) for p in module.parameters())
