"""Decode attention over the flat variable-length layout equals float64 attention on the kept tokens."""

import pytest
import torch

from rap.kv.attention import varlen_attention, varlen_attention_torch
from rap.kv.cache import FlatKV


def random_layout(B, H, D, dtype, device, seed=0, max_len=300, slack=7):
    """Random per-(sequence, head) lengths in a flat buffer with random free rows between segments."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (B * H,), generator=g)
    capacity = lengths + torch.randint(0, slack, (B * H,), generator=g)
    starts = torch.cumsum(capacity, 0) - capacity
    total = int(capacity.sum())
    keys = torch.randn(total, D, generator=g).to(dtype)
    values = torch.randn(total, D, generator=g).to(dtype)
    kv = FlatKV(keys.to(device), values.to(device), starts.to(device), lengths.to(device),
                int(lengths.max()), B, H)
    return kv


def reference_float64(query, kv: FlatKV, scaling):
    """Loop over (sequence, query head): dense softmax attention in float64 on that head's kept rows."""
    B, Hq, q, D = query.shape
    g = Hq // kv.num_kv_heads
    out = torch.zeros(B, q, Hq, D, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            k, v = kv.dense(b * kv.num_kv_heads + hq // g)
            k, v = k.double().cpu(), v.double().cpu()
            n = k.shape[0]
            for j in range(q):
                visible = n - q + j + 1  # the q new tokens are the last rows, causal among themselves
                s = (query[b, hq, j].double().cpu() @ k[:visible].T) * scaling
                out[b, j, hq] = torch.softmax(s, -1) @ v[:visible]
    return out


def rel_err(out, ref):
    diff = (out.double().cpu() - ref).norm(dim=-1)
    return (diff / ref.norm(dim=-1).clamp_min(1e-12)).max().item()


CASES = [  # B, H_kv, group, D, q
    (1, 3, 3, 64, 1),   # SmolLM2's geometry, one decode step
    (2, 2, 4, 32, 1),
    (3, 4, 1, 16, 1),   # no GQA
    (2, 3, 3, 64, 5),   # a 5-token chunk (a question) read through the compressed cache
]


@pytest.mark.parametrize("B,H,g,D,q", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
def test_varlen_decode_attention_matches_float64_reference_on_kept_tokens(B, H, g, D, q, dtype, tol):
    kv = random_layout(B, H, D, dtype, "cpu", seed=B * 100 + q)
    query = torch.randn(B, H * g, q, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    scaling = D ** -0.5
    out = varlen_attention_torch(query, kv, scaling)
    assert out.shape == (B, q, H * g, D) and out.dtype == dtype
    assert rel_err(out, reference_float64(query, kv, scaling)) < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernel)")
@pytest.mark.parametrize("B,H,g,D,q", CASES + [(8, 3, 3, 64, 1)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
def test_triton_varlen_attention_matches_float64_reference_on_gpu(B, H, g, D, q, dtype, tol):
    from rap.kv.attention import triton_available, varlen_attention_triton

    assert triton_available()
    kv = random_layout(B, H, D, dtype, "cuda", seed=7 + q, max_len=3000)
    query = torch.randn(B, H * g, q, D, generator=torch.Generator().manual_seed(2)).to(dtype).cuda()
    ref = reference_float64(query, kv, D ** -0.5)
    assert rel_err(varlen_attention_triton(query, kv, D ** -0.5), ref) < tol
    assert rel_err(varlen_attention_torch(query, kv, D ** -0.5), ref) < tol


def test_varlen_attention_uses_the_torch_reference_on_cpu():
    kv = random_layout(1, 2, 16, torch.float32, "cpu")
    query = torch.randn(1, 4, 1, 16)
    assert torch.equal(varlen_attention(query, kv, 0.25), varlen_attention_torch(query, kv, 0.25))
