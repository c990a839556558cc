#!/usr/bin/env bash
# End-to-end check of sageLLM on a CUDA device, after the module was built and installed with
# SAGELLM_CUDA=ON:
#   tests  the CUDA runtime tests (parity with the CPU fp32 path and with transformers in bf16,
#          CUDA graphs, no host sync inside a step), the step-input packing tests and the
#          benchmark tests (the SDPA baseline on a fused backend)
#   qwen   benchmarks/throughput.py, Qwen2.5-0.5B shape, random weights: sageLLM vs transformers
#          at batch 128 (target >= 15x output tok/s), batch-1 decode against the weight roofline
#   llama  the same in the Llama-3-8B shape, 64 prompts of up to 512 output tokens (transformers
#          is slow at 8B; both engines run the same workload)
#   ops    `sage-llm bench op all --device cuda` (kernels against copy bandwidth, GEMM, torch)
#
#   tools/device/e2e_cuda.sh                 # tests qwen llama
#   tools/device/e2e_cuda.sh ops tests       # any subset, in the order given
#
# Every step runs under a time limit with its log and JSON under $OUT (a temporary folder when
# unset); a failing step is reported and the next one still runs. The exit status is 1 when any
# step failed. A summary table is printed last.
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d -t sagellm-e2e-XXXXXX)}
mkdir -p "$OUT"
PY=${PYTHON:-python}
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(tests qwen llama)

SUMMARY="$OUT/steps.tsv"
: > "$SUMMARY"
failed=0

run_step() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  local start rc
  start=$(date +%s)
  printf '%q ' "$@" > "$OUT/$name.log"
  echo >> "$OUT/$name.log"
  timeout --kill-after=20 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - start ))
  tail -n 25 "$OUT/$name.log"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "--- $name: TIMED OUT after ${took}s (log: $OUT/$name.log)"
  elif [ $rc -ne 0 ]; then
    echo "--- $name: FAILED with status $rc after ${took}s (log: $OUT/$name.log)"
  else
    echo "--- $name: ok in ${took}s"
  fi
  [ $rc -ne 0 ] && failed=1
  printf '%s\t%s\t%s\n' "$name" "$rc" "$took" >> "$SUMMARY"
}

run_step environment 60 "$PY" -c "
import torch, sagellm.ops as ops
info = ops.build_info()
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
print(info)
assert info['cuda'], 'this build has no CUDA kernels'
assert torch.cuda.is_available(), 'torch sees no GPU'
"

for step in "${STEPS[@]}"; do
  case $step in
    tests)
      run_step runtime_tests 480 "$PY" -m pytest -q -rs -p no:cacheprovider \
        tests/runtime/test_cuda_runner.py tests/runtime/test_step_inputs.py \
        tests/bench/test_bench_cli.py tests/bench/test_throughput.py \
        --junitxml="$OUT/runtime_tests.xml"
      ;;
    qwen)
      run_step throughput_qwen2.5-0.5b 300 "$PY" benchmarks/throughput.py \
        --shape qwen2.5-0.5b --device cuda --batch-1 --max-num-seqs 128 --hf-batch-size 128 \
        --output "$OUT/throughput_qwen2.5-0.5b.json"
      ;;
    llama)
      run_step throughput_llama3-8b 420 "$PY" benchmarks/throughput.py \
        --shape llama3-8b --device cuda --batch-1 --num-prompts 64 --output-len 100-512 \
        --hf-batch-size 64 --output "$OUT/throughput_llama3-8b.json"
      ;;
    ops)
      run_step bench_ops 480 "$PY" -m sagellm.bench op all --device cuda --dtype bf16 \
        --output "$OUT/bench_ops.json"
      ;;
    *)
      echo "unknown step '$step' (choose from tests, qwen, llama, ops)"
      failed=1
      ;;
  esac
done

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print(f"\n== summary (logs and JSON in {out})")
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, took = line.split("\t")
    state = "ok" if rc == "0" else ("TIMEOUT" if rc in ("124", "137") else f"FAILED ({rc})")
    print(f"  {name:<28} {state:<12} {took:>5} s")

rows = []
for path in sorted(out.glob("throughput_*.json")):
    r = json.loads(path.read_text())
    sg, hf = r["backends"].get("sagellm", {}), r["backends"].get("transformers", {})
    ratio = r.get("ratios_vs_transformers", {}).get("sagellm", {}).get("output_tok_s")
    b1 = sg.get("batch_1", {})
    rows.append((
        r["parameters"].get("shape") or Path(r["parameters"].get("model", "?")).name,
        sg.get("batch", {}).get("output_tok_s"),
        hf.get("batch", {}).get("output_tok_s"),
        ratio,
        b1.get("decode_tok_s"),
        b1.get("roofline_tok_s"),
        b1.get("fraction_of_roofline"),
        sg.get("stats", {}).get("cuda_graph_replays"),
        r["context"].get("copy_bw_gb_s"),
    ))
if rows:
    def f(v, fmt):
        return "-" if v is None else fmt.format(v)
    head = ("shape", "sagellm out/s", "HF out/s", "x HF", "b1 tok/s", "roofline", "of roof",
            "replays", "copy GB/s")
    lines = [head] + [
        (s, f(a, "{:.0f}"), f(b, "{:.0f}"), f(x, "{:.2f}"), f(c, "{:.1f}"), f(d, "{:.1f}"),
         f(e, "{:.2f}"), f(g, "{}"), f(h, "{:.0f}"))
        for s, a, b, x, c, d, e, g, h in rows
    ]
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    print("\n== throughput (targets: x HF >= 15 on qwen2.5-0.5b at batch 128; of roof >= 0.5)")
    for row in lines:
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
PYEOF
exit $failed
