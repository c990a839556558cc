"""torch.compile(fullgraph=True) traces a whole decoder layer built on the sagellm ops: every op
has a fake kernel and a schema that declares what it mutates."""

from __future__ import annotations

import torch

from sagellm.ops import activation, attention, cache, norm, rotary


def llama_like_layer(
    x,
    residual,
    positions,
    w_qkv,
    w_o,
    w_gate_up,
    w_down,
    n1,
    n2,
    cos_sin,
    key_cache,
    value_cache,
    slot_mapping,
    block_tables,
    seq_lens,
    qsl,
):
    h, kh, d = 4, 2, 64
    x, residual = x.clone(), residual.clone()
    norm.fused_add_rms_norm(x, residual, n1, 1e-6)
    qkv = x @ w_qkv.t()
    q, k, v = qkv.split([h * d, kh * d, kh * d], dim=-1)
    q, k = q.contiguous(), k.contiguous()
    rotary.rotary_embedding(positions, q, k, d, cos_sin, True)
    cache.reshape_and_cache(
        k.view(-1, kh, d), v.reshape(-1, kh, d), key_cache, value_cache, slot_mapping
    )
    o = attention.paged_attention_prefill(
        q.view(-1, h, d), key_cache, value_cache, block_tables, seq_lens, qsl, d**-0.5
    )
    x = o.view(-1, h * d) @ w_o.t()
    norm.fused_add_rms_norm(x, residual, n2, 1e-6)
    y = activation.silu_and_mul(x @ w_gate_up.t()) @ w_down.t()
    return y, residual


def make_inputs():
    torch.manual_seed(0)
    t, e, h, kh, d, inter, bs, nb = 10, 256, 4, 2, 64, 512, 16, 8
    f = torch.float32
    args = dict(
        x=torch.randn(t, e, dtype=f),
        residual=torch.randn(t, e, dtype=f),
        positions=torch.arange(t, dtype=torch.int64),
        w_qkv=torch.randn((h + 2 * kh) * d, e, dtype=f) * 0.05,
        w_o=torch.randn(e, h * d, dtype=f) * 0.05,
        w_gate_up=torch.randn(2 * inter, e, dtype=f) * 0.05,
        w_down=torch.randn(e, inter, dtype=f) * 0.05,
        n1=torch.rand(e, dtype=f) + 0.5,
        n2=torch.rand(e, dtype=f) + 0.5,
        cos_sin=rotary.make_cos_sin_cache(d, 64),
        key_cache=torch.zeros(nb, bs, kh, d, dtype=f),
        value_cache=torch.zeros(nb, bs, kh, d, dtype=f),
        slot_mapping=torch.arange(t, dtype=torch.int64) + 3 * bs,  # block 3 onwards
        block_tables=torch.tensor([[3, 4]], dtype=torch.int32),
        seq_lens=torch.tensor([t], dtype=torch.int32),
        qsl=torch.tensor([0, t], dtype=torch.int32),
    )
    return args


def test_fullgraph_compile_matches_eager():
    eager_in, compiled_in = make_inputs(), make_inputs()
    y_eager, r_eager = llama_like_layer(**eager_in)
    compiled = torch.compile(llama_like_layer, fullgraph=True, backend="aot_eager")
    y_comp, r_comp = compiled(**compiled_in)
    torch.testing.assert_close(y_comp, y_eager)
    torch.testing.assert_close(r_comp, r_eager)
    # The cache writes happened inside the compiled graph too.
    torch.testing.assert_close(compiled_in["key_cache"], eager_in["key_cache"])
    assert compiled_in["key_cache"][3].abs().sum() > 0
