"""Tensor-parallel execution: one model over N ranks, the scheduler on rank 0.

Rank 0 is the engine's own process. Its workers (ranks 1..N-1) are started by the engine
(torch.multiprocessing, spawn, rendezvous on a free loopback port) or by torchrun, whose env://
rendezvous a multi-node launcher speaks too (ranks > 0 then run `worker_main`). Every rank builds
its shard of the model from a lazily read checkpoint (only its slices are read) and its own paged
KV cache (its KV heads; the block count decided by rank 0), then each step:

    rank 0: schedule -> pack the step into two flat host buffers (step_inputs) -> broadcast a
            header (on a gloo control group) and the buffers (on the TP group) -> forward ->
            logits (all-gathered) -> sample
    rank r: receive the header and buffers -> the same forward and logits

A worker that dies or hangs surfaces on rank 0 as a TensorParallelError: the worker processes
are checked before every step, and every collective has the group's timeout. The control group,
which idle workers block on between steps, has no practical timeout (an idle server is not an
error); rank 0 bounds its own waits on it by the collective timeout.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import time
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sagellm.distributed.group import (
    TPGroup,
    env_launch,
    exact_reduce,
    free_port,
    init_distributed,
)
from sagellm.models.base import CausalLM
from sagellm.models.layers.attention import AttentionMetadata
from sagellm.models.layers.quant_weights import quantize_for_checkpoint
from sagellm.models.registry import model_class
from sagellm.models.sharded_checkpoint import load_sharded_checkpoint
from sagellm.runtime.config import DTYPES, EngineConfig
from sagellm.runtime.errors import TensorParallelError
from sagellm.runtime.model_runner import ModelRunner
from sagellm.runtime.scheduler import ScheduledBatch
from sagellm.runtime.step_inputs import StepLayout, stage

log = logging.getLogger("sagellm.runtime")

_STOP, _STEP = 0, 1
_HEADER = 8  # cmd, tokens, rows, width, num_logits, decode_only, i64 size, i32 size
_IDLE_TIMEOUT = datetime.timedelta(days=365)
_LOAD_TIMEOUT_S = 3600.0


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """The device of `rank`: the CPU, or one GPU per rank (LOCAL_RANK under torchrun)."""
    dev = config.resolved_device()
    if dev.type != "cuda":
        return dev
    local = int(os.environ.get("LOCAL_RANK", rank))
    return torch.device("cuda", local)


def load_shard(config: EngineConfig, tp: TPGroup, device: torch.device, tokenizer: bool):
    """(checkpoint with lazy weights, this rank's model shard, loaded)."""
    ckpt = load_sharded_checkpoint(
        config.model,
        dtype=lambda cfg, fmt: config.resolved_dtype(DTYPES.get(cfg.torch_dtype), fmt, device),
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
        load_tokenizer=tokenizer,
        quantized_on=device if config.dtype == "auto" else None,
    )
    with torch.device(device):
        model: CausalLM = model_class(ckpt.config.architecture)(ckpt.config, ckpt.dtype, device, tp)
    model = model.eval().requires_grad_(False)
    # Each rank quantizes its own slice (int4 groups fit the slice's input columns).
    quantize_for_checkpoint(model, config.quantization, ckpt)
    model.load_weights(ckpt.weights.items())
    ckpt.weights = {}
    return ckpt, model


def unpack_step(
    header: list[int], i64: torch.Tensor, i32: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
    """(input_ids, positions, metadata, logit_rows) as views of a step's two flat buffers."""
    _, tokens, rows, width, num_logits, decode_only, _, _ = header
    lay = StepLayout(tokens, rows, width, num_logits)
    meta = AttentionMetadata(
        slot_mapping=i64[lay.slots : lay.slots + tokens],
        block_tables=i32[lay.block_tables :].view(rows, width),
        seq_lens=i32[:rows],
        query_start_loc=i32[lay.query_start_loc : lay.query_start_loc + rows + 1],
        decode_only=bool(decode_only),
    )
    logit_rows = i64[lay.logit_rows : lay.logit_rows + num_logits]
    return i64[:tokens], i64[lay.positions : lay.positions + tokens], meta, logit_rows


@dataclass
class _Channels:
    """The groups a step travels on: `control` (gloo, idle-proof) for the header, `tp` for the
    buffers and the model's own collectives."""

    tp: TPGroup
    control: dist.ProcessGroup
    timeout_s: float


def _join_groups(size: int, device: torch.device, timeout_s: float) -> _Channels:
    tp = TPGroup.create(timeout_s)
    tp.exact = exact_reduce(device)
    control = dist.new_group(list(range(size)), backend="gloo", timeout=_IDLE_TIMEOUT)
    if device.type == "cuda":
        from sagellm.distributed.custom_ar import maybe_custom_all_reduce

        tp.custom_ar = maybe_custom_all_reduce(tp, device, exchange_group=control)
    return _Channels(tp, control, timeout_s)


class TPExecutor:
    """Rank 0's side: starts (or joins) the workers, loads its shard, and drives every step."""

    def __init__(self, config: EngineConfig, timeout_s: float | None = None):
        size = config.tensor_parallel_size
        self.config, self.size = config, size
        threads = cpu_threads_per_rank(config)
        if threads:
            torch.set_num_threads(threads)
        self.timeout_s = timeout_s or config.distributed_timeout_s
        self.procs: list[mp.Process] = []
        launched = env_launch()
        if launched is not None:
            rank, world = launched
            if rank != 0 or world != size:
                raise ValueError(
                    f"launched as rank {rank} of {world}, but the engine runs on rank 0 of "
                    f"tensor_parallel_size = {size} (ranks > 0 run sagellm.runtime.tp_executor."
                    "worker_main)"
                )
            init_method = "env://"
        else:
            init_method = f"tcp://127.0.0.1:{free_port()}"
            ctx = mp.get_context("spawn")
            for r in range(1, size):
                p = ctx.Process(
                    target=_spawned_worker,
                    args=(config, r, init_method, self.timeout_s),
                    name=f"sagellm-tp{r}",
                    daemon=True,
                )
                p.start()
                self.procs.append(p)
        self._finalizer = weakref.finalize(self, _kill, list(self.procs))
        self.device = rank_device(config, 0)
        try:
            init_distributed(0, size, self.device, init_method, self.timeout_s)
            self.ch = _join_groups(size, self.device, self.timeout_s)
            self.checkpoint, self.model = load_shard(config, self.ch.tp, self.device, True)
            self._wait_ready()
        except BaseException:
            self.shutdown()
            raise
        self._stopped = False

    @property
    def tp(self) -> TPGroup:
        return self.ch.tp

    # -- liveness ------------------------------------------------------------------------------
    def check_workers(self) -> None:
        """Raise TensorParallelError if a spawned worker has exited."""
        for r, p in enumerate(self.procs, start=1):
            if p.exitcode is not None:
                raise TensorParallelError(
                    f"tensor-parallel worker rank {r} (pid {p.pid}) exited with code {p.exitcode}"
                )

    def _failure(self, what: str, err: BaseException) -> TensorParallelError:
        self._broken = True  # shutdown kills the workers without waiting for them
        for p in self.procs:  # a worker killed mid-collective takes a moment to be reaped
            p.join(timeout=0.5)
            if p.exitcode is not None:
                break
        try:
            self.check_workers()
        except TensorParallelError as dead:
            return TensorParallelError(f"{dead} ({what}: {type(err).__name__})")
        # The backend's own text names source files and peer addresses: the log gets it, the
        # error (which reaches API clients) only its type.
        log.error("%s failed", what, exc_info=err)
        return TensorParallelError(
            f"{what} failed: a tensor-parallel rank did not answer within "
            f"{self.timeout_s:g} s or failed ({type(err).__name__})"
        )

    def _wait_ready(self) -> None:
        """Block until every worker has loaded its shard (a dead worker raises)."""
        store = dist.distributed_c10d._get_default_store()
        keys = [f"sagellm/ready/{r}" for r in range(1, self.size)]
        deadline = time.monotonic() + _LOAD_TIMEOUT_S
        while not store.check(keys):
            self.check_workers()
            if time.monotonic() > deadline:
                raise TensorParallelError(f"workers not loaded after {_LOAD_TIMEOUT_S:g} s")
            time.sleep(0.05)
        failed = [r for r in range(1, self.size) if store.get(keys[r - 1]) != b"ok"]
        if failed:
            msg = store.get(keys[failed[0] - 1]).decode(errors="replace")
            raise TensorParallelError(f"tensor-parallel worker rank {failed[0]} failed: {msg}")

    # -- steps ---------------------------------------------------------------------------------
    def _send(self, tensor: torch.Tensor, control: bool) -> None:
        if control:
            work = dist.broadcast(tensor, group_src=0, group=self.ch.control, async_op=True)
            if not work.wait(timeout=datetime.timedelta(seconds=self.timeout_s)):
                raise TimeoutError(f"no answer within {self.timeout_s:g} s")
        else:
            self.tp.broadcast(tensor, 0)

    def make_runner(
        self, num_blocks: int, block_size: int, kv_dtype: torch.dtype | None = None
    ) -> ModelRunner:
        """Every rank's KV cache gets num_blocks blocks; returns rank 0's runner."""
        self.check_workers()
        try:
            self._send(torch.tensor([num_blocks, block_size], dtype=torch.int64), control=True)
        except Exception as e:
            raise self._failure("sending the KV cache size", e) from e
        return TPModelRunner(self, self.model, num_blocks, block_size, self.device, kv_dtype)

    def send_step(self, header: list[int], i64: torch.Tensor, i32: torch.Tensor) -> None:
        self.check_workers()
        try:
            self._send(torch.tensor(header, dtype=torch.int64), control=True)
            self._send(i64, control=False)
            self._send(i32, control=False)
        except Exception as e:
            raise self._failure("broadcasting a step", e) from e

    def shutdown(self) -> None:
        """Stop the workers (a stop message, then a kill after a grace period) and leave the
        process group."""
        healthy = not getattr(self, "_broken", False) and getattr(self, "_stopped", True) is False
        if healthy and all(p.exitcode is None for p in self.procs):
            try:
                header = [_STOP] + [0] * (_HEADER - 1)
                self._send(torch.tensor(header, dtype=torch.int64), control=True)
            except Exception:
                pass  # the workers are killed below
        self._stopped = True
        if healthy:
            for p in self.procs:
                p.join(timeout=5)
        self._finalizer()
        if dist.is_initialized():
            dist.destroy_process_group()


class TPModelRunner(ModelRunner):
    """Rank 0's ModelRunner: each eager step's packed inputs go to the workers first (CUDA
    graphs are not captured under tensor parallelism)."""

    def __init__(self, executor: TPExecutor, model, num_blocks, block_size, device, kv_dtype=None):
        super().__init__(model, num_blocks, block_size, device, kv_dtype)
        self.executor = executor

    def _graph_bucket(self, batch: ScheduledBatch) -> int | None:
        return None

    def prepare(self, batch: ScheduledBatch):
        host, event = self._buffers()
        step = stage(batch, host, self.block_rows, self.block_size)
        lay = step.layout
        i64, i32 = host.i64[: lay.i64_size], host.i32[: lay.i32_size]
        if self.device.type != "cpu":
            i64 = i64.to(self.device, non_blocking=True)
            i32 = i32.to(self.device, non_blocking=True)
            if event is not None:
                event.record(torch.cuda.current_stream(self.device))
        header = [_STEP, lay.tokens, lay.rows, lay.width, lay.num_logits, int(step.decode_only)]
        header += [lay.i64_size, lay.i32_size]
        self.executor.send_step(header, i64, i32)
        ids, pos, meta, rows = unpack_step(header, i64, i32)
        return ids, pos, meta, rows, step.samplers

    def execute(self, batch: ScheduledBatch):
        try:
            return super().execute(batch)
        except TensorParallelError:
            raise
        except RuntimeError as e:  # a collective inside the forward (gloo / NCCL)
            raise self.executor._failure("a step's collective", e) from e


# ---- workers ----------------------------------------------------------------------------------


def _kill(procs: list) -> None:
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join(timeout=5)


def _spawned_worker(config: EngineConfig, rank: int, init_method: str, timeout_s: float) -> None:
    # Ctrl-C in a terminal reaches the whole process group: rank 0 alone handles it and stops
    # the workers (a stop message, then a kill), so a worker must not die mid-collective first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _serve(config, rank, init_method, timeout_s)


def worker_main(config: EngineConfig) -> None:
    """Run a rank > 0 of a torchrun (env://) launch until rank 0's engine shuts down."""
    launched = env_launch()
    if launched is None or launched[0] == 0:
        raise ValueError("worker_main runs ranks > 0 of a torchrun launch (RANK >= 1)")
    _serve(config, launched[0], "env://", config.distributed_timeout_s)


def cpu_threads_per_rank(config: EngineConfig) -> int | None:
    """Torch threads for each CPU rank: num_threads when set, else the cores shared out among
    the ranks of this host (each rank defaulting to every core oversubscribes them N times)."""
    if config.num_threads:
        return config.num_threads
    if config.device != "cpu" and torch.cuda.is_available():
        return None
    return max(1, (os.cpu_count() or 1) // config.tensor_parallel_size)


def _serve(config: EngineConfig, rank: int, init_method: str, timeout_s: float) -> None:
    threads = cpu_threads_per_rank(config)
    if threads:
        torch.set_num_threads(threads)
    size = config.tensor_parallel_size
    device = rank_device(config, rank)
    init_distributed(rank, size, device, init_method, timeout_s)
    ch = _join_groups(size, device, timeout_s)
    store = dist.distributed_c10d._get_default_store()
    try:
        _, model = load_shard(config, ch.tp, device, tokenizer=False)
    except Exception as e:
        store.set(f"sagellm/ready/{rank}", f"{type(e).__name__}: {e}")
        raise
    store.set(f"sagellm/ready/{rank}", "ok")
    sizes = torch.empty(2, dtype=torch.int64)
    dist.broadcast(sizes, group_src=0, group=ch.control)
    num_blocks, block_size = sizes.tolist()
    runner = ModelRunner(
        model, num_blocks, block_size, device, config.resolved_kv_dtype(model.dtype)
    )
    header_t = torch.empty(_HEADER, dtype=torch.int64)
    try:
        while True:
            dist.broadcast(header_t, group_src=0, group=ch.control)
            header = header_t.tolist()
            if header[0] == _STOP:
                break
            i64 = torch.empty(header[6], dtype=torch.int64, device=device)
            i32 = torch.empty(header[7], dtype=torch.int32, device=device)
            ch.tp.broadcast(i64, 0)
            ch.tp.broadcast(i32, 0)
            ids, pos, meta, rows = unpack_step(header, i64, i32)
            with torch.inference_mode():
                hidden = model(ids, pos, runner.kv_caches, meta)
                if header[4]:
                    model.compute_logits(hidden[rows])
    finally:
        dist.destroy_process_group()
