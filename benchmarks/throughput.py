"""Offline batch throughput of sageLLM against HF transformers (and llama.cpp), same run.

    python benchmarks/throughput.py                          # default model, CPU preset
    python benchmarks/throughput.py --dtype bfloat16 --batch-1 --output smollm2.json
    python benchmarks/throughput.py --shape qwen2.5-0.5b --device cuda --batch-1   # GPU, random weights

The same as `sage-llm bench throughput`; options and figures are described in
sagellm/bench/throughput.py (`--help` lists them).
"""

from __future__ import annotations

import sys

from sagellm.bench.throughput import main

if __name__ == "__main__":
    sys.exit(main(prog="benchmarks/throughput.py"))
