"""Token generation over an artifact's prefill and decode programs (cache layout in ``runtime.kv_cache``).

Prompts of different lengths are left-padded; positions count real tokens, as Hugging Face's
``generate`` does. Greedy by default; temperature, top-k and top-p sampling with a seed; stop ids end
a row (its later steps yield nothing); ``stream`` receives each step's tokens as they come.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import LccError
from .model import default_positions


@dataclass
class Sampling:
    """How the next token is picked from the last logits."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: Sequence[int] = field(default_factory=tuple)

    def __post_init__(self):
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise LccError("sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0")


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits [B, V]."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        drop = probs.cumsum(-1) - probs > sampling.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def pad_prompts(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, names: Sequence[str], max_len: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked prompts as left-padded (ids, mask) [B, longest]; one clear error for what a program cannot take."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LccError("empty prompt: give at least one token per prompt")
    if max_new_tokens < 1:
        raise LccError("max_new_tokens must be at least 1")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > max_len:
        raise LccError(f"a prompt of {longest} tokens plus {max_new_tokens} new ones exceeds the program's maximum length {max_len}")
    for p in prompts:
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise LccError(f"token id {bad[0]} is outside the vocabulary 0..{vocab_size - 1}")
    if len({len(p) for p in prompts}) > 1 and "attention_mask" not in names:
        raise LccError("prompts of different lengths need padding, and this program was captured without an attention_mask")
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[row, longest - len(p) :] = 1
    return ids, mask


def token_steps(logits: torch.Tensor, advance: Callable[[torch.Tensor], torch.Tensor], max_new_tokens: int, sampling: Sampling) -> Iterator[list[int | None]]:
    """Each step's token per row (None once a row has stopped): picked from ``logits`` [B, V], then from
    ``advance(tokens [B])`` — the next step's logits — until every row stopped or ``max_new_tokens`` were made."""
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    done = torch.zeros(logits.shape[0], dtype=torch.bool)
    stops = torch.tensor(list(sampling.stop_ids), dtype=torch.long)
    for step in range(max_new_tokens):
        token = pick(logits, sampling, generator)
        yield [None if d else int(t) for t, d in zip(token, done, strict=True)]
        done |= torch.isin(token, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            return
        logits = advance(token)


def collect(steps: Iterator[list[int | None]], rows: int, stream: Callable[[list[int | None]], None] | None = None) -> list[list[int]]:
    """The new tokens of each row from :func:`token_steps` (a stop id, when hit, is the last), each step shown to ``stream``."""
    out: list[list[int]] = [[] for _ in range(rows)]
    for tokens in steps:
        if stream is not None:
            stream(tokens)
        for row, t in enumerate(tokens):
            if t is not None:
                out[row].append(t)
    return out


CACHE_MODES = ("static", "growing")


class Generator:
    """Runs prefill once, then decode one token at a time, keeping the caches between steps.

    ``cache="growing"`` appends each token to the caches (a copy per step); ``"static"`` allocates
    them once at prompt + new tokens and writes each token into its slot.
    """

    def __init__(self, programs: dict[str, Callable], signature: dict):
        self.programs = programs
        self.names = signature["inputs"]
        self.max_len = int(signature["max_len"])
        self.vocab_size = int(signature["vocab_size"])

    def _batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_prompts(prompts, max_new_tokens, pad_id, self.names, self.max_len, self.vocab_size)

    def _inputs(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        given = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        return {name: given[name] for name in self.names}

    def stream(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        sampling: Sampling | None = None,
        pad_id: int = 0,
        cache: str = "static",
    ) -> Iterator[list[int | None]]:
        """Yield each step's new token per prompt (None once a prompt has stopped)."""
        if cache not in CACHE_MODES:
            raise LccError(f"unknown cache mode '{cache}'; choose one of {', '.join(CACHE_MODES)}")
        if cache not in self.programs:
            raise LccError(f"this artifact has no {cache}-cache decode program; re-convert it with this lcc")
        ids, mask = self._batch(prompts, max_new_tokens, pad_id)
        positions = default_positions(mask, *mask.shape, mask.device)
        with torch.inference_mode():
            logits, *caches = self.programs["prefill"](self._inputs(ids, mask, positions))
            decode = self._grow(mask, caches) if cache == "growing" else self._static(mask, caches, max_new_tokens)

            def advance(token: torch.Tensor) -> torch.Tensor:
                nonlocal positions
                positions = positions[:, -1:] + 1
                return decode(self._inputs(token[:, None], torch.ones_like(token[:, None]), positions))[:, -1]

            yield from token_steps(logits[:, -1], advance, max_new_tokens, sampling or Sampling())

    def _grow(self, mask: torch.Tensor, caches: list[torch.Tensor]) -> Callable[[dict], torch.Tensor]:
        """A decode step over caches that grow by one key per step."""

        def step(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            nonlocal mask, caches
            past = mask if "attention_mask" in self.names else None
            logits, *caches = self.programs["growing"](inputs, past, caches)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            return logits

        return step

    def _static(self, mask: torch.Tensor, caches: list[torch.Tensor], max_new_tokens: int) -> Callable[[dict], torch.Tensor]:
        """A decode step over caches allocated once for the whole generation and written slot by slot.

        Each step passes views of the filled prefix (the new token's slot included), so attention
        reads only written keys and, with the in-place rewrite of ``runtime.steps``, no step copies a cache.
        """
        B, prompt = mask.shape
        extra = max_new_tokens - 1  # the last new token is never fed back
        caches = [torch.nn.functional.pad(c, (0, 0, 0, extra)) for c in caches]
        mask = torch.nn.functional.pad(mask, (0, extra))
        slot = prompt

        def step(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            nonlocal slot
            slots = torch.full((B,), slot, dtype=torch.long, device=mask.device)
            logits, *_ = self.programs["static"](inputs, mask[:, : slot + 1], [c[:, :, : slot + 1] for c in caches], slots)
            mask[:, slot] = 1
            slot += 1
            return logits

        return step

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 32,
        sampling: Sampling | None = None,
        pad_id: int = 0,
        stream: Callable[[list[int | None]], None] | None = None,
        cache: str = "static",
    ) -> list[list[int]]:
        """The new tokens of each prompt (a stop id, when hit, is the last)."""
        return collect(self.stream(prompts, max_new_tokens, sampling, pad_id, cache), len(prompts), stream)


def generate(programs: dict[str, Callable], signature: dict, prompts, max_new_tokens: int, pad_id: int, stream, cache: str, **sampling) -> list[list[int]]:
    """One generation call over bound step programs; ``sampling`` keys as :class:`Sampling`."""
    return Generator(programs, signature).generate(prompts, max_new_tokens, Sampling(**sampling), pad_id, stream, cache)
