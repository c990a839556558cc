"""`sage-llm run -p PROMPT`: answer once, in process, streaming the text to stdout and the
request's metrics to stderr — like `ollama run MODEL PROMPT`."""

from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument(
        "-p", "--prompt", required=True, help="the prompt (a user message for chat models)"
    )
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help="local dir, .gguf file or HF id (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--ignore-eos", action="store_true", help="generate max-tokens tokens regardless of EOS"
    )
    p.add_argument(
        "--raw", action="store_true", help="send the prompt as is, without the chat template"
    )
    p.add_argument("--system", default=None, help="a system message for chat models")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "int8", "fp8_e4m3"],
        help="KV cache storage: the model dtype, or 1-byte int8 / fp8 with scales (auto)",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="split the model over N ranks, one process each (under torchrun: its world size)",
    )
    p.add_argument(
        "--quantization",
        default="none",
        choices=["none", "int8", "int4", "fp8"],
        help="quantize a dense checkpoint's weights at load (fp8: CUDA only) (none)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--no-stream", action="store_true", help="print the answer only when complete")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON on stderr")
    p.set_defaults(func=run)


def format_metrics(m, load_s: float | None = None) -> str:
    parts = [
        f"TTFT {m.ttft_ms:.1f} ms",
        f"TPOT {m.tpot_ms:.1f} ms",
        f"{m.throughput_tps:.1f} tok/s",
        f"prompt {m.prompt_tokens} tok",
        f"output {m.output_tokens} tok",
        f"KV {m.kv_used_tokens} tok",
        f"prefix hit {m.prefix_hit_rate:.0%}",
        f"peak mem {m.peak_mem_mb:.0f} MiB",
    ]
    if load_s is not None:
        parts.append(f"load {load_s:.2f} s")
    return " | ".join(parts)


def run(args) -> int:
    import dataclasses
    import json

    from sagellm.distributed.group import env_launch
    from sagellm.runtime.config import EngineConfig
    from sagellm.runtime.engine import LLMEngine
    from sagellm.runtime.params import SamplingParams

    engine = None
    try:
        config = EngineConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            kv_cache_dtype=args.kv_cache_dtype,
            quantization=args.quantization,
            tensor_parallel_size=args.tensor_parallel_size,
            num_threads=args.threads,
            load_progress=sys.stderr.isatty(),
        )
        launched = env_launch()
        if launched and config.tensor_parallel_size == 1:  # torchrun's world size decides
            config = dataclasses.replace(config, tensor_parallel_size=launched[1])
        if launched and launched[0] > 0:  # a torchrun worker: serve rank 0's steps, print nothing
            from sagellm.runtime.tp_executor import worker_main

            worker_main(config)
            return 0
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
        )
        engine = LLMEngine(config)
        prompt = args.prompt
        tok = engine.tokenizer
        if not args.raw and tok.has_chat_template:
            messages = [{"role": "user", "content": prompt}]
            if args.system:
                messages.insert(0, {"role": "system", "content": args.system})
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        engine.add_request(_encode(engine, prompt, raw=args.raw), params)
        final = None
        while engine.has_unfinished():
            for out in engine.step():
                if not args.no_stream and out.delta_text:
                    sys.stdout.write(out.delta_text)
                    sys.stdout.flush()
                if out.finished:
                    final = out
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a one-line reason, never a traceback
        reason = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"sage-llm run: error: {reason or type(e).__name__}", file=sys.stderr)
        return 1
    finally:
        if engine is not None:
            engine.close()
    if args.no_stream:
        sys.stdout.write(final.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    m = final.metrics
    if args.json:
        print(
            json.dumps(
                {**m.to_dict(), "load_s": engine.load_time_s, "finish_reason": final.finish_reason}
            ),
            file=sys.stderr,
        )
    else:
        print(
            f"--- {format_metrics(m, engine.load_time_s)} | finish {final.finish_reason}",
            file=sys.stderr,
        )
    return 0


def _encode(engine, prompt: str, raw: bool) -> list[int]:
    # A chat template already carries the BOS/role markers; the raw prompt gets the tokenizer's
    # usual special tokens.
    return engine.tokenizer.encode(prompt, add_special_tokens=raw)
