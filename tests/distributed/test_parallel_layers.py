"""The tensor-parallel layers on 2 gloo ranks equal the dense layers on one: column-parallel
(fused shards, bias, gathered outputs), row-parallel (partial sums all-reduced, bias once),
vocabulary-parallel embedding and tied LM head, and GGUF blocks split on and off block
boundaries."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from tests.distributed.spawn import run_ranks

Q8_0 = int(GGMLQuantizationType.Q8_0)


def _q8(w: torch.Tensor):
    from sagellm.models.gguf_loader import GGUFWeight

    data = torch.from_numpy(np.ascontiguousarray(quantize(w.numpy(), GGMLQuantizationType.Q8_0)))
    return GGUFWeight("w", data, Q8_0, tuple(w.shape))


def _layers(rank: int, world: int) -> None:
    from sagellm.distributed.group import TPGroup
    from sagellm.distributed.sharding import split_range
    from sagellm.models.layers.linear import GGUFWeights, Linear, VocabParallelEmbedding

    tp = TPGroup.world()
    g = torch.Generator().manual_seed(0)  # the same "checkpoint" on every rank
    x = torch.randn(5, 64, generator=g)
    tol = dict(atol=2e-5, rtol=2e-5)

    # Column-parallel fused projection (q rows split 3 + 2 heads of 8, k/v replicated), bias.
    wq, wk = torch.randn(40, 64, generator=g), torch.randn(8, 64, generator=g)
    bq, bk = torch.randn(40, generator=g), torch.randn(8, generator=g)
    q0, qn = [(0, 24), (24, 16)][rank]
    col = Linear(
        64,
        shards=[("q", qn), ("k", 8)],
        bias=True,
        tp=tp,
        row_slices={"q": (q0, qn), "k": (0, 8)},
        name="qk",
    )
    col.load_weight(wq, "q"), col.load_weight(wk, "k")
    col.load_bias(bq, "q"), col.load_bias(bk, "k")
    col.finish_loading()
    dense = F.linear(x, torch.cat([wq, wk]), torch.cat([bq, bk]))
    expect = torch.cat([dense[:, q0 : q0 + qn], dense[:, 40:48]], dim=1)
    torch.testing.assert_close(col(x), expect, **tol)
    assert col.weight.shape == (qn + 8, 64), "a rank holds only its rows"

    # Row-parallel with bias: the all-reduce adds the bias once.
    w, b = torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    c0, cn = split_range(64, world, rank)
    row = Linear(cn, 48, bias=True, tp=tp, col_slice=(c0, cn), name="o")
    row.load_weight(w), row.load_bias(b), row.finish_loading()
    assert row.weight.shape == (48, cn)
    torch.testing.assert_close(row(x[:, c0 : c0 + cn].contiguous()), F.linear(x, w, b), **tol)

    # Exact row-parallel: output rows over the whole K, inputs and outputs gathered; every
    # element is the dot product one process computes, so the result is bit-identical.
    from sagellm.models.llama import exact_row_parallel

    widths = [split_range(64, world, r)[1] for r in range(world)]
    exact = exact_row_parallel(
        64, 48, widths, tp, bias=True, name="ox", dtype=torch.float32, device="cpu"
    )
    exact.load_weight(w), exact.load_bias(b), exact.finish_loading()
    assert exact.weight.shape == (split_range(48, world, rank)[1], 64)
    one = Linear(64, 48, bias=True, name="one")
    one.load_weight(w), one.load_bias(b), one.finish_loading()
    got = exact.forward_gathered(x[:, c0 : c0 + cn].contiguous())
    torch.testing.assert_close(got, one(x), atol=0, rtol=0)

    # Column-parallel LM head over an uneven vocabulary, logits gathered.
    vocab = 101
    head_w = torch.randn(vocab, 64, generator=g)
    sizes = [split_range(vocab, world, r)[1] for r in range(world)]
    v0, vn = split_range(vocab, world, rank)
    head = Linear(64, vn, tp=tp, row_slices={None: (v0, vn)}, gather_sizes=sizes, name="head")
    head.load_weight(head_w), head.finish_loading()
    torch.testing.assert_close(head(x), F.linear(x, head_w), **tol)

    # Vocabulary-parallel embedding and its tied head.
    emb = VocabParallelEmbedding(vocab, 64, tp=tp, dtype=torch.float32, device="cpu", name="e")
    emb.load_weight(head_w), emb.finish_loading()
    ids = torch.tensor([0, 50, 51, 100, 7, 50])
    torch.testing.assert_close(emb(ids), head_w[ids], atol=0, rtol=0)
    torch.testing.assert_close(emb.unembed(x), F.linear(x, head_w), **tol)

    # GGUF Q8_0 blocks (32 columns): a row-parallel split at 32 keeps blocks; one at 48 does not
    # fall on a block boundary and is dequantized. Both equal the unsplit quantized layer.
    wg = torch.randn(16, 96, generator=g)
    full = Linear(96, 16, method=GGUFWeights(), name="full")
    full.load_weight(_q8(wg)), full.finish_loading()
    xg = torch.randn(3, 96, generator=g)
    expect = full(xg)
    for cut in (32, 48):
        c0, cn = [(0, cut), (cut, 96 - cut)][rank]
        part = Linear(cn, 16, method=GGUFWeights(), tp=tp, col_slice=(c0, cn), name=f"g{cut}")
        part.load_weight(_q8(wg)), part.finish_loading()
        kinds = [q for q, _ in part.method.describe()]
        assert kinds == ([Q8_0] if cut == 32 else [None]), f"cut {cut}: parts {kinds}"
        # gguf_linear rounds activations to int8 blocks; the dense slice does not.
        torch.testing.assert_close(
            part(xg[:, c0 : c0 + cn].contiguous()), expect, atol=0.15, rtol=0.02
        )


def test_parallel_layers_equal_dense():
    run_ranks(_layers)
