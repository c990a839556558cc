"""Device self-test of the CUDA paged_attention_prefill kernel.

Run on the GPU machine after building sagellm._C with SAGELLM_CUDA=ON:

    python tools/device/prefill_selftest.py [--quick] [--json PATH]

1. Correctness: torch.ops.sagellm.paged_attention_prefill on CUDA against the fp64 reference
   (sagellm.ops.reference.attention) over ragged batches with cached prefixes, every head size,
   MHA / GQA / MQA and groups larger than a tile, sliding windows, soft caps, block sizes
   1 / 7 / 16 / 32 / 64, bf16 / fp16 / fp32, strided and misaligned queries (the SIMT fallback).
   Prints the max error per case and PASS / FAIL (tolerances of tests/ops/tolerances.py).
2. Speed: bf16 causal prefill of one 4096-token prompt (32 query heads, 8 KV heads, d=128,
   block size 16, shuffled blocks) against F.scaled_dot_product_attention(is_causal=True,
   enable_gqa=True) on contiguous tensors; TFLOP/s of both, counting 4 * heads * d * n(n+1)/2.
Exit status 1 when any case fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import sagellm  # noqa: E402,F401  (registers torch.ops.sagellm)
from sagellm.ops.reference import attention as ref  # noqa: E402
from tests.ops.tolerances import tol  # noqa: E402

DEV = "cuda"
HEAD_SIZES = [64, 80, 96, 128, 256]
GQA = [(4, 4), (8, 2), (14, 2), (4, 1)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (seq_len, q_len): whole prompt; extend after a prefix, spanning two 128-row tiles; empty;
# single token; short extend of a long context; a long extend.
RAGGED = [(40, 40), (300, 123), (17, 0), (1, 1), (700, 5), (260, 150)]


def make_cache(seq_lens, num_kv_heads, head_size, block_size, dtype, gen):
    """Random K/V caches (CPU) and a block table of shuffled ids. Unused table entries hold
    garbage ids; the spare blocks and the slots past each sequence's end in its last block hold
    NaN, so a kernel that reads (or multiplies by zero) anything past a sequence fails."""
    used = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(used) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(shape, generator=gen).to(dtype)
    value_cache = torch.randn(shape, generator=gen).to(dtype)
    ids = torch.randperm(num_blocks, generator=gen, dtype=torch.int32)
    key_cache[ids[sum(used) :].long()] = float("nan")
    value_cache[ids[sum(used) :].long()] = float("nan")
    max_blocks = max(used + [1]) + 2
    block_tables = torch.randint(
        -(2**30), 2**30, (len(seq_lens), max_blocks), dtype=torch.int32, generator=gen
    )
    start = 0
    for i, n in enumerate(used):
        block_tables[i, :n] = ids[start : start + n]
        start += n
        if n and seq_lens[i] % block_size:
            last = int(block_tables[i, n - 1])
            key_cache[last, seq_lens[i] % block_size :] = float("nan")
            value_cache[last, seq_lens[i] % block_size :] = float("nan")
    return key_cache, value_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32)


def query_start_loc(q_lens):
    return torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)


def run_case(
    name,
    seqs,
    heads,
    head_size,
    block_size,
    dtype,
    gen,
    window=None,
    cap=None,
    query_layout="contiguous",
    tile=None,
):
    """One batch on CUDA vs the reference; returns a result dict."""
    seq_lens, q_lens = (list(x) for x in zip(*seqs))
    num_heads, num_kv_heads = heads
    kc, vc, bt, sl = make_cache(seq_lens, num_kv_heads, head_size, block_size, dtype, gen)
    qsl = query_start_loc(q_lens)
    n = sum(q_lens)
    query = torch.randn(n, num_heads, head_size, generator=gen).to(dtype)
    scale = head_size**-0.5
    want = ref.paged_attention_prefill(
        query, kc, vc, bt, sl, qsl, scale, sliding_window=window, soft_cap=cap
    )

    if query_layout == "fused_qkv":  # rows strided inside a wider tensor, 16-byte aligned
        big = torch.randn(n, num_heads + 2 * num_kv_heads, head_size, device=DEV).to(dtype)
        big[:, :num_heads] = query.to(DEV)
        q_dev = big[:, :num_heads]
    elif query_layout == "misaligned":  # storage offset of one element: SIMT fallback
        flat = torch.empty(n * num_heads * head_size + 1, dtype=dtype, device=DEV)
        q_dev = flat[1:].view(n, num_heads, head_size)
        q_dev.copy_(query.to(DEV))
    else:
        q_dev = query.to(DEV)
    out = torch.full((n, num_heads, head_size), float("nan"), dtype=dtype, device=DEV)
    if tile:  # an alternative tile shape of the d=128 tensor-core kernel (paged_prefill.cu)
        os.environ["SAGELLM_PREFILL_TILE128"] = tile
    try:
        torch.ops.sagellm.paged_attention_prefill(
            out,
            q_dev,
            kc.to(DEV),
            vc.to(DEV),
            bt.to(DEV),
            sl.to(DEV),
            qsl.to(DEV),
            scale,
            -1 if window is None else window,
            0.0 if cap is None else cap,
        )
    finally:
        os.environ.pop("SAGELLM_PREFILL_TILE128", None)
    if DEV == "cuda":
        torch.cuda.synchronize()
    got = out.cpu()
    t = tol(dtype)
    err = (got.double() - want.double()).abs()
    bound = t["atol"] + t["rtol"] * want.double().abs()
    ok = bool(torch.isfinite(got).all()) and bool((err <= bound).all())
    max_err = float(err.max()) if err.numel() else 0.0
    return {"case": name, "max_abs_err": max_err, "pass": ok}


def correctness_cases(quick):
    """(name, kwargs) for run_case."""
    cases = []
    block_sizes = [16, 32, 7]
    i = 0
    for dname in DTYPES:
        for d in HEAD_SIZES:
            for heads in GQA if not quick else [(8, 2)]:
                bs = block_sizes[i % len(block_sizes)]
                i += 1
                cases.append(
                    (
                        f"{dname} d={d} heads={heads} bs={bs} ragged",
                        dict(seqs=RAGGED, heads=heads, head_size=d, block_size=bs, dtype=dname),
                    )
                )
    for dname in DTYPES:
        for window, cap in [(1, None), (29, None), (None, 20.0), (64, 3.0), (100, 30.0)]:
            for d in (64, 128) if not quick else (128,):
                cases.append(
                    (
                        f"{dname} d={d} heads=(9, 3) window={window} cap={cap}",
                        dict(
                            seqs=[(200, 200), (500, 70), (60, 1), (1000, 300)],
                            heads=(9, 3),
                            head_size=d,
                            block_size=16,
                            dtype=dname,
                            window=window,
                            cap=cap,
                        ),
                    )
                )
    for bs in (1, 64):
        cases.append(
            (
                f"bf16 d=128 heads=(8, 2) bs={bs}",
                dict(seqs=RAGGED, heads=(8, 2), head_size=128, block_size=bs, dtype="bf16"),
            )
        )
    # Groups wider than a tile (128 rows; 64 at d=256): the group is split into head tiles.
    for heads in [(40, 1), (96, 2), (160, 1)]:
        for d in (64, 256):
            cases.append(
                (
                    f"bf16 d={d} heads={heads} large group",
                    dict(
                        seqs=[(1, 1), (70, 3), (300, 20)],
                        heads=heads,
                        head_size=d,
                        block_size=16,
                        dtype="bf16",
                    ),
                )
            )
    cases.append(
        (
            "fp32 d=64 heads=(40, 1) large group",
            dict(
                seqs=[(1, 1), (70, 3), (300, 20)],
                heads=(40, 1),
                head_size=64,
                block_size=16,
                dtype="fp32",
            ),
        )
    )
    # Many short sequences: the tile -> sequence search takes two rounds (> 32 sequences).
    g = torch.Generator().manual_seed(7)
    many = []
    for _ in range(300):
        q = int(torch.randint(0, 12, (1,), generator=g))
        many.append((q + int(torch.randint(0, 90, (1,), generator=g)), q))
    cases.append(
        (
            "bf16 d=128 heads=(32, 8) 300 sequences",
            dict(seqs=many, heads=(32, 8), head_size=128, block_size=16, dtype="bf16"),
        )
    )
    cases.append(
        (
            "fp16 d=96 heads=(4, 4) 300 sequences",
            dict(seqs=many, heads=(4, 4), head_size=96, block_size=7, dtype="fp16"),
        )
    )
    # Long: a 2048-token prompt and a 512-token chunk after a 2500-token prefix.
    for dname in ("bf16", "fp16") if not quick else ("bf16",):
        cases.append(
            (
                f"{dname} d=128 heads=(8, 2) long",
                dict(
                    seqs=[(2048, 2048), (3012, 512)],
                    heads=(8, 2),
                    head_size=128,
                    block_size=16,
                    dtype=dname,
                ),
            )
        )
    for tile in ("1x8x64", "2x4x32"):
        for dname in ("bf16", "fp16"):
            cases.append(
                (
                    f"{dname} d=128 heads=(8, 2) tile {tile}",
                    dict(
                        seqs=RAGGED,
                        heads=(8, 2),
                        head_size=128,
                        block_size=16,
                        dtype=dname,
                        tile=tile,
                    ),
                )
            )
        cases.append(
            (
                f"bf16 d=128 heads=(9, 3) window=64 cap=30.0 tile {tile}",
                dict(
                    seqs=[(200, 200), (500, 70), (60, 1), (1000, 300)],
                    heads=(9, 3),
                    head_size=128,
                    block_size=16,
                    dtype="bf16",
                    window=64,
                    cap=30.0,
                    tile=tile,
                ),
            )
        )
    for layout in ("fused_qkv", "misaligned"):
        for dname in ("bf16", "fp32"):
            cases.append(
                (
                    f"{dname} d=64 heads=(8, 2) query {layout}",
                    dict(
                        seqs=RAGGED,
                        heads=(8, 2),
                        head_size=64,
                        block_size=16,
                        dtype=dname,
                        query_layout=layout,
                    ),
                )
            )
    return cases


def time_ms(fn, iters=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return sorted(times)[len(times) // 2]


def bench(n=4096, prefix=0, heads=(32, 8), head_size=128, block_size=16):
    """TFLOP/s of the paged kernel and of SDPA on the same causal problem (n new tokens after
    `prefix` cached ones)."""
    num_heads, num_kv_heads = heads
    dtype = torch.bfloat16
    total = prefix + n
    gen = torch.Generator().manual_seed(0)
    kc, vc, bt, sl = make_cache([total], num_kv_heads, head_size, block_size, dtype, gen)
    kc, vc, bt, sl = kc.to(DEV), vc.to(DEV), bt.to(DEV), sl.to(DEV)
    qsl = query_start_loc([n]).to(DEV)
    query = torch.randn(n, num_heads, head_size, device=DEV, dtype=dtype)
    out = torch.empty_like(query)
    scale = head_size**-0.5

    def paged():
        torch.ops.sagellm.paged_attention_prefill(out, query, kc, vc, bt, sl, qsl, scale, -1, 0.0)

    # The same keys, contiguous: [1, heads, tokens, d].
    used = (total + block_size - 1) // block_size
    k = kc[bt[0, :used].long()].flatten(0, 1)[:total].transpose(0, 1).unsqueeze(0).contiguous()
    v = vc[bt[0, :used].long()].flatten(0, 1)[:total].transpose(0, 1).unsqueeze(0).contiguous()
    q = query.transpose(0, 1).unsqueeze(0).contiguous()

    def sdpa():
        if prefix == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        # Bottom-right aligned causal mask for an extend: query i sees keys <= prefix + i.
        mask = torch.ones(n, total, dtype=torch.bool, device=DEV).tril(prefix)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def sdpa_flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa()

    # The flash backend when it takes the problem (it is torch's fastest on this device).
    backend, baseline = "flash", sdpa_flash
    try:
        baseline()
    except RuntimeError:
        backend, baseline = "default", sdpa

    paged()
    ref_out = baseline()[0].transpose(0, 1)
    agree = float((out.float() - ref_out.float()).abs().max())
    pairs = n * prefix + n * (n + 1) / 2
    flops = 4 * num_heads * head_size * pairs
    t_paged = time_ms(paged)
    t_sdpa = time_ms(baseline)
    return {
        "tokens": n,
        "prefix": prefix,
        "heads": list(heads),
        "head_size": head_size,
        "block_size": block_size,
        "sdpa_backend": backend,
        "paged_ms": t_paged,
        "sdpa_ms": t_sdpa,
        "paged_tflops": flops / t_paged / 1e9,
        "sdpa_tflops": flops / t_sdpa / 1e9,
        "ratio": t_sdpa / t_paged,
        "max_abs_diff_vs_sdpa": agree,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer correctness cases")
    parser.add_argument("--no-bench", action="store_true", help="skip the timing")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--device", default="cuda", help="cpu checks this script against the CPU kernel"
    )
    args = parser.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    print(f"device: {name}  torch {torch.__version__}")

    results = []
    gen = torch.Generator().manual_seed(1234)
    for case, kw in correctness_cases(args.quick):
        kw = dict(kw, dtype=DTYPES[kw["dtype"]])
        try:
            r = run_case(case, gen=gen, **kw)
        except Exception as e:  # report and keep going: one broken case must not hide others
            r = {"case": case, "max_abs_err": float("nan"), "pass": False, "error": repr(e)}
        results.append(r)
        status = "PASS" if r["pass"] else "FAIL"
        extra = f"  {r['error']}" if "error" in r else ""
        print(f"{status}  max_err={r['max_abs_err']:.3e}  {case}{extra}", flush=True)
    failed = [r for r in results if not r["pass"]]
    print(f"\n{len(results) - len(failed)}/{len(results)} cases passed")

    benches = []
    if not args.no_bench and DEV == "cuda":
        configs = [
            dict(n=4096),  # the target problem
            dict(n=4096, heads=(32, 32), head_size=64),
            dict(n=512, prefix=3584),  # an extend chunk after a long prefix
            dict(n=8192),
        ]
        # Alternative tile shapes of the d=128 kernel (paged_prefill.cu), on the target problem.
        configs += [dict(n=4096, tile=t) for t in ("1x8x64", "2x4x32")]
        for cfg in configs:
            tile = cfg.pop("tile", "2x4x64")
            os.environ["SAGELLM_PREFILL_TILE128"] = tile
            try:
                benches.append({**bench(**cfg), "tile128": tile})
            except Exception as e:
                benches.append({**cfg, "tile128": tile, "error": repr(e)})
            finally:
                del os.environ["SAGELLM_PREFILL_TILE128"]
        print(
            "\n| tokens | prefix | heads | d | tile (d=128) | paged ms | SDPA ms (backend) "
            "| paged TFLOP/s | SDPA TFLOP/s | paged/SDPA | max diff |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for b in benches:
            if "error" in b:
                print(f"| {b.get('n')} | {b.get('prefix', 0)} | {b['tile128']} | {b['error']} |")
                continue
            print(
                f"| {b['tokens']} | {b['prefix']} | {b['heads'][0]}/{b['heads'][1]} "
                f"| {b['head_size']} | {b['tile128']} | {b['paged_ms']:.3f} "
                f"| {b['sdpa_ms']:.3f} ({b['sdpa_backend']}) | {b['paged_tflops']:.1f} "
                f"| {b['sdpa_tflops']:.1f} | {b['ratio']:.2f} | {b['max_abs_diff_vs_sdpa']:.2e} |"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"device": name, "cases": results, "bench": benches},
                indent=1,
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
