"""Benchmarks of sageLLM: `op` times kernels against their references (sagellm.bench.cli)."""
