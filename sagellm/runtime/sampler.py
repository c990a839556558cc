"""Batched sampling: penalties, temperature, min-p, top-k, top-p and per-request seeds.

Order of processing, per row (same as vLLM):
  penalties -> temperature -> [logprobs taken here] -> min-p -> top-k -> top-p -> sample.

Logprobs are those of the *processed* distribution: ``log_softmax`` of the logits after
penalties and temperature, before min-p/top-k/top-p truncation (greedy rows count temperature
as 1). Truncation is a sampling device, not part of the model's belief, and a logprob of -inf
for every truncated alternative would be useless to clients.

Sampling is by inverse CDF: one float64 uniform ``u`` per row, and the first token whose
float64 cumulative probability exceeds ``u``. A seeded row draws its ``u`` from its own
generator, so its tokens depend only on its seed and logits, never on which requests share the
batch or where it sits in it; unseeded rows share torch's default generator. (The exponential
race, argmax(probs / Exponential noise), is equally exact but needs one random number per
vocabulary entry: ~2 ms a row on a CPU core for a 50k vocabulary, against ~0.2 ms here.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sagellm.runtime.params import SamplingParams

_MASK = float("-inf")
# Partial-sort width tried first for top-p (see apply_top_k_top_p).
_CANDIDATES = 256


@dataclass
class SamplerOutput:
    """token_ids: [num_seqs] int64.
    logprobs: [num_seqs] float32, logprob of each chosen token; None when no row asked.
    top_logprobs: (values [num_seqs, k] float32 sorted descending, ids [num_seqs, k] int64) with
    k = the largest ``logprobs`` asked by any row (rows that asked fewer slice their own);
    None when no row asked.
    """

    token_ids: Tensor
    logprobs: Tensor | None = None
    top_logprobs: tuple[Tensor, Tensor] | None = None


@dataclass
class SamplingBatch:
    """Per-row sampling state for one step; build it with :meth:`build`.

    Tensors are [num_seqs] unless noted; an optional field is None when no row uses it.
    """

    num_seqs: int
    device: torch.device
    temperature: Tensor  # float32, 1.0 on greedy rows so that division is a no-op
    greedy: Tensor  # bool
    all_greedy: bool
    any_greedy: bool
    top_k: Tensor | None  # int64, 0 = off
    max_top_k: int  # largest enabled top_k, 0 if none
    top_p: Tensor | None  # float32, 1.0 = off
    min_p: Tensor | None  # float32, 0.0 = off
    repetition_penalty: Tensor | None  # float32; penalty tensors and token tensors come together
    presence_penalty: Tensor | None
    frequency_penalty: Tensor | None
    prompt_tokens: Tensor | None  # [num_seqs, max_prompt_len] int64, -1 padded
    output_tokens: Tensor | None  # [num_seqs, max_output_len] int64, -1 padded
    generators: list[torch.Generator | None]
    seeded_rows: list[int]  # sampled rows with their own generator
    seeded_row_index: Tensor | None  # the same rows as an int64 tensor on the device
    unseeded_rows: Tensor | None  # int64 indices of sampled rows on the default generator
    max_num_logprobs: int | None  # None: no row wants logprobs
    max_token_id: int = -1  # largest id in prompt_tokens / output_tokens (-1: none), host-known

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty is not None

    @classmethod
    def build(
        cls,
        params_list: Sequence[SamplingParams],
        output_token_ids: Sequence[Sequence[int]],
        prompt_token_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        device: torch.device | str,
    ) -> SamplingBatch:
        """One row per sequence. ``generators[i]`` draws row i's randomness (None: the default
        generator); it must live on ``device`` and is advanced by every sampled step."""
        n = len(params_list)
        for name, seq in (
            ("output_token_ids", output_token_ids),
            ("prompt_token_ids", prompt_token_ids),
            ("generators", generators),
        ):
            if len(seq) != n:
                raise ValueError(f"len({name}) = {len(seq)} must equal len(params_list) = {n}")
        if n == 0:
            raise ValueError("params_list is empty: a sampling batch needs at least one row")
        device = torch.device(device)

        def column(values: list, dtype: torch.dtype) -> Tensor:
            return _to_device(torch.tensor(values, dtype=dtype), device)

        greedy = [p.is_greedy for p in params_list]
        all_greedy, any_greedy = all(greedy), any(greedy)
        temps = [1.0 if g else p.temperature for p, g in zip(params_list, greedy, strict=True)]

        sampled = [
            (i, p) for i, (p, g) in enumerate(zip(params_list, greedy, strict=True)) if not g
        ]
        top_k = top_p = min_p = None
        max_top_k = 0
        if any(p.top_k > 0 for _, p in sampled):
            ks = [0 if g else max(p.top_k, 0) for p, g in zip(params_list, greedy, strict=True)]
            top_k, max_top_k = column(ks, torch.int64), max(ks)
        if any(p.top_p < 1.0 for _, p in sampled):
            ps = [1.0 if g else p.top_p for p, g in zip(params_list, greedy, strict=True)]
            top_p = column(ps, torch.float32)
        if any(p.min_p > 0.0 for _, p in sampled):
            ms = [0.0 if g else p.min_p for p, g in zip(params_list, greedy, strict=True)]
            min_p = column(ms, torch.float32)

        rep = pres = freq = prompt_t = output_t = None
        max_token = -1
        if any(p.uses_penalties for p in params_list):
            rep = column([p.repetition_penalty for p in params_list], torch.float32)
            pres = column([p.presence_penalty for p in params_list], torch.float32)
            freq = column([p.frequency_penalty for p in params_list], torch.float32)
            # Only rows that use a penalty pay for their tokens; the prompt only matters to the
            # repetition penalty.
            outs = [
                o if p.uses_penalties else ()
                for p, o in zip(params_list, output_token_ids, strict=True)
            ]
            prompts = [
                t if p.repetition_penalty != 1.0 else ()
                for p, t in zip(params_list, prompt_token_ids, strict=True)
            ]
            output_t, top_out = _padded("output_token_ids", outs, device)
            prompt_t, top_prompt = _padded("prompt_token_ids", prompts, device)
            max_token = max(top_out, top_prompt)

        seeded = [i for i, _ in sampled if generators[i] is not None]
        unseeded = [i for i, _ in sampled if generators[i] is None]
        asked = [p.logprobs for p in params_list if p.logprobs is not None]
        return cls(
            num_seqs=n,
            device=device,
            temperature=column(temps, torch.float32),
            greedy=column(greedy, torch.bool),
            all_greedy=all_greedy,
            any_greedy=any_greedy,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=rep,
            presence_penalty=pres,
            frequency_penalty=freq,
            prompt_tokens=prompt_t,
            output_tokens=output_t,
            generators=list(generators),
            seeded_rows=seeded,
            seeded_row_index=column(seeded, torch.int64) if seeded else None,
            unseeded_rows=column(unseeded, torch.int64) if unseeded else None,
            max_num_logprobs=max(asked) if asked else None,
            max_token_id=max_token,
        )


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device`; to a GPU through pinned memory, so the copy does not make the
    host wait for the device (the pinned block is not reused before the copy has run)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _padded(name: str, rows: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, int]:
    """[len(rows), longest] int64, -1 padded, on `device`; and the largest id (-1: none)."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), -1, dtype=torch.int64)
    top = -1
    for i, r in enumerate(rows):
        if len(r):
            t = torch.as_tensor(r, dtype=torch.int64)
            if int(t.min()) < 0:
                raise ValueError(f"{name}[{i}] contains {int(t.min())}: token ids must be >= 0")
            top = max(top, int(t.max()))
            out[i, : len(r)] = t
    return _to_device(out, device), top


def token_counts(
    tokens: Tensor,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
    max_token: int | None = None,
) -> Tensor:
    """tokens: [num_seqs, L] int64, -1 padded -> counts [num_seqs, vocab_size] of ``dtype``.

    max_token: the largest id in ``tokens`` when the caller knows it; otherwise it is read from
    the tensor, which on a GPU makes the host wait for the device."""
    if max_token is None:
        max_token = int(tokens.max()) if tokens.numel() else -1
    if max_token >= vocab_size:
        raise ValueError(f"token id {max_token} is out of range [0, {vocab_size})")
    # Padding goes to a spare last column that is dropped, so scatter_add needs no mask.
    index = tokens.masked_fill(tokens < 0, vocab_size)
    counts = torch.zeros(tokens.shape[0], vocab_size + 1, dtype=dtype, device=tokens.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=dtype))
    return counts[:, :vocab_size]


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """logits: [num_seqs, vocab] float32, modified in place and returned.

    repetition (HF/vLLM): for tokens in prompt or output, logit / r if logit > 0 else logit * r.
    presence/frequency (OpenAI): logit -= presence * (count > 0) + frequency * count, counting
    output tokens only.
    """
    if not batch.uses_penalties:
        return logits
    vocab = logits.shape[1]
    top = batch.max_token_id
    out_counts = token_counts(batch.output_tokens, vocab, logits.dtype, top)
    seen = (token_counts(batch.prompt_tokens, vocab, logits.dtype, top) > 0) | (out_counts > 0)
    r = batch.repetition_penalty[:, None]
    penalised = torch.where(logits > 0, logits / r, logits * r)
    logits.copy_(torch.where(seen, penalised, logits))
    logits -= batch.frequency_penalty[:, None] * out_counts
    logits -= batch.presence_penalty[:, None] * (out_counts > 0).to(logits.dtype)
    return logits


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Mask tokens whose probability is below ``min_p * max probability`` (in place)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill_(probs < threshold, _MASK)


def apply_top_k_top_p(
    logits: Tensor, top_k: Tensor | None, max_top_k: int, top_p: Tensor | None
) -> Tensor:
    """Keep each row's ``top_k`` largest logits (0 = all), then the smallest prefix of those, by
    decreasing probability renormalised over them, whose mass reaches ``top_p`` (1 = all).
    Masked logits become -inf, in place. Ties at a boundary are broken by ``topk``'s order.

    On the CPU a full sort of a 50k vocabulary costs ~8 ms a row, so the nucleus is first looked
    for among the ``_CANDIDATES`` largest logits (a partial sort, ~0.4 ms), and the full sort
    only runs when some row's nucleus is wider than that.
    """
    if top_k is None and top_p is None:
        return logits
    rows, vocab = logits.shape
    k = top_k if top_k is not None else torch.zeros(rows, dtype=torch.int64, device=logits.device)
    k_eff = torch.where(k > 0, k.clamp(max=vocab), vocab)[:, None]
    p = top_p if top_p is not None else torch.ones(rows, device=logits.device)
    p = p.to(torch.float64)[:, None]
    restricted = (k[:, None] > 0) | (p < 1.0)
    width = min(vocab, max(max_top_k, _CANDIDATES if top_p is not None else 1))
    if top_p is not None and logits.device.type != "cpu":
        width = vocab  # GPUs sort fast; the candidate check would cost a device sync
    while True:
        values, order = logits.topk(width, dim=-1)  # descending
        keep = torch.arange(width, device=logits.device)[None, :] < k_eff
        if top_p is None:
            break
        # Renormalise over the top-k set when it lies inside the candidates, else over the row.
        in_k_norm = values.masked_fill(~keep, _MASK).logsumexp(dim=-1, keepdim=True)
        norm = torch.where(k_eff <= width, in_k_norm, logits.logsumexp(dim=-1, keepdim=True))
        probs = (values.double() - norm.double()).exp_().masked_fill_(~keep, 0.0)
        mass_before = probs.cumsum(dim=-1) - probs
        keep &= (mass_before < p) | (p >= 1.0)
        if width == vocab:
            break
        covered = (k_eff <= width) | ((p < 1.0) & (mass_before[:, -1:] + probs[:, -1:] >= p))
        if bool((covered | ~restricted).all()):
            break
        width = vocab
    drop = torch.ones_like(logits, dtype=torch.bool).scatter_(1, order, ~keep)
    return logits.masked_fill_(drop & restricted, _MASK)


def make_generators(seed: int | None, n: int, device: torch.device | str) -> list:
    """Generators for the ``n`` sequences of one request: sequence 0 uses ``seed`` itself, the
    others a SplitMix64 mix of (seed, index) so that they differ from other requests' seeds."""
    if seed is None:
        return [None] * n
    gens = []
    for i in range(n):
        s = seed % 2**64
        if i:
            s = (s + 0x9E3779B97F4A7C15 * i) % 2**64
            s = ((s ^ (s >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
            s = ((s ^ (s >> 27)) * 0x94D049BB133111EB) % 2**64
            s ^= s >> 31
        gens.append(torch.Generator(device=device).manual_seed(s))
    return gens


def _uniforms(batch: SamplingBatch, device: torch.device) -> Tensor:
    """One float64 uniform in [0, 1) per row: seeded rows from their own generator, the others
    from the default one; greedy rows get 0 and advance nothing."""
    u = torch.zeros(batch.num_seqs, dtype=torch.float64, device=device)
    if batch.unseeded_rows is not None:
        u[batch.unseeded_rows] = torch.rand(
            len(batch.unseeded_rows), dtype=torch.float64, device=device
        )
    if batch.seeded_rows:
        draws = [
            torch.rand(1, dtype=torch.float64, device=device, generator=batch.generators[row])
            for row in batch.seeded_rows
        ]
        u[batch.seeded_row_index] = torch.cat(draws)
    return u


def sample_from_probs(probs: Tensor, u: Tensor, fallback: Tensor) -> Tensor:
    """Inverse-CDF draw: probs [num_seqs, vocab] (unnormalised, >= 0), u [num_seqs] in [0, 1).
    The first token whose float64 cumulative mass exceeds ``u * total``; a token of probability
    0 can never be that one. Rows with no mass at all return ``fallback`` [num_seqs]."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1]
    ids = torch.searchsorted(cdf, (u * total)[:, None], right=True).squeeze(1)
    ids = ids.clamp_(max=probs.shape[1] - 1)
    return torch.where(total > 0, ids, fallback)


class Sampler:
    """Stateless: everything per request lives in the :class:`SamplingBatch`."""

    def sample(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [num_seqs, vocab] float (any dtype), on ``batch.device``; not modified."""
        self._check(logits, batch)
        if batch.all_greedy and not batch.uses_penalties:
            token_ids = logits.argmax(dim=-1)
            if batch.max_num_logprobs is None:
                return SamplerOutput(token_ids)
            return self._with_logprobs(token_ids, logits.float(), batch.max_num_logprobs)

        x = logits.to(torch.float32, copy=True)
        apply_penalties(x, batch)
        if not batch.all_greedy:
            x.div_(batch.temperature[:, None])
        processed = x if batch.max_num_logprobs is None else x.clone()
        greedy_ids = x.argmax(dim=-1) if batch.any_greedy else None
        if batch.all_greedy:
            token_ids = greedy_ids
        else:
            if batch.min_p is not None:
                apply_min_p(x, batch.min_p)
            apply_top_k_top_p(x, batch.top_k, batch.max_top_k, batch.top_p)
            # A row that is -inf everywhere gives NaN probabilities: it falls back to argmax.
            probs = torch.softmax(x, dim=-1).nan_to_num_(nan=0.0)
            fallback = greedy_ids if greedy_ids is not None else x.argmax(dim=-1)
            token_ids = sample_from_probs(probs, _uniforms(batch, x.device), fallback)
            if greedy_ids is not None:
                token_ids = torch.where(batch.greedy, greedy_ids, token_ids)
        if batch.max_num_logprobs is None:
            return SamplerOutput(token_ids)
        return self._with_logprobs(token_ids, processed, batch.max_num_logprobs)

    @staticmethod
    def _with_logprobs(token_ids: Tensor, logits: Tensor, k: int) -> SamplerOutput:
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
        values, ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)
        return SamplerOutput(token_ids, chosen, (values, ids))

    @staticmethod
    def _check(logits: Tensor, batch: SamplingBatch) -> None:
        if logits.dim() != 2 or not logits.is_floating_point():
            raise ValueError(
                f"logits must be a 2-D float tensor [num_seqs, vocab], got "
                f"{tuple(logits.shape)} {logits.dtype}"
            )
        if logits.shape[0] != batch.num_seqs:
            raise ValueError(
                f"logits has {logits.shape[0]} rows but the sampling batch has {batch.num_seqs}"
            )
        if logits.device.type != batch.device.type or (
            batch.device.index is not None and batch.device.index != logits.device.index
        ):
            raise ValueError(f"logits are on {logits.device} but the batch on {batch.device}")
        for row in batch.seeded_rows:
            gen = batch.generators[row]
            if gen.device.type != logits.device.type:
                raise ValueError(
                    f"generators[{row}] is on {gen.device} but logits are on {logits.device}"
                )
