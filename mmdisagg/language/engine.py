"""Iteration-level batching over a paged KV cache: admission by KV blocks, preemption by
recompute, one forward pass per step.

Requests wait in ``waiting`` until the KV blocks for their known tokens plus one are free,
then run. Each ``step`` feeds one token to every decoding request and the next prompt tokens
(at most ``max_prefill_tokens`` in all; only rows that are here, when a prompt is still
arriving) to those still prefilling, in one forward pass, and
samples where a sequence reached its last token. When a decoding request needs a new block
and none is free, the most recently admitted request is preempted: its blocks are freed and
it goes back to the front of ``waiting``, to be recomputed from its prompt and the tokens it
already produced (kept in host memory) — its output is what an uninterrupted run gives.

With the prefix cache (``kv_blocks``), a request starts from the longest prefix of its prompt
the cache holds: found when the prompt was announced (its embeddings were never sent), or
else when it is admitted. Once its prompt is computed, the prompt's blocks are indexed; once
it finishes, the blocks its generated tokens filled too (a chat's next turn repeats them).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from mmdisagg.config import EngineSettings
from mmdisagg.language.kv_blocks import KVBlockManager
from mmdisagg.language.kv_memory import build_kv_cache
from mmdisagg.language.request import Req, ReqStatus
from mmdisagg.language.runner import ModelRunner
from mmdisagg.language.sampler import check_params, request_seed
from mmdisagg.models.base import LanguageHalf
from mmdisagg.models.errors import InputError
from mmdisagg.models.grammar import new_matcher
from mmdisagg.models.kv_cache import PagedKVCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutput:
    """What one step did for one request: a new token, or ``error`` set when the request
    failed. ``finish_reason`` is None while the request goes on, else "stop" (a stop id or
    EOS; stop strings are found later, by the detokenizer), "length" or "error"."""

    req: Req
    token_id: int
    finish_reason: str | None
    error: str | None = None
    logprob: tuple[float, list[tuple[int, float]]] | None = None  # if the request asked

    @property
    def request_id(self) -> str:
        return self.req.request_id


@dataclass
class PrefillArea:
    """What one prefill step's attention pads: every chunk to the longest (``queries`` tokens
    at most, padding included) and every chunk's cached context to the longest (``keys``
    tokens at most, in whole blocks). The first chunk is only held to ``queries``."""

    queries: int
    keys: int
    block_size: int
    rows: int = 0
    longest_chunk: int = 0
    longest_context: int = 0

    def fits(self, computed: int, pending: int | None = None) -> int:
        """The longest next chunk (at most ``pending`` tokens) of a sequence that has
        ``computed`` tokens cached; 0 if none fits."""
        pending = self.queries if pending is None else pending
        if self.rows == 0:
            return min(pending, self.queries)
        rows = self.rows + 1
        if rows * self.longest_chunk > self.queries:
            return 0
        # the chunk may grow the longest context up to the keys' share of each row
        keys_per_row = self.keys // rows // self.block_size * self.block_size
        if keys_per_row < self.longest_context:
            return 0
        return max(0, min(pending, self.queries // rows, keys_per_row - computed))

    def take(self, computed: int, pending: int) -> int:
        count = self.fits(computed, pending)
        if count:
            self.rows += 1
            self.longest_chunk = max(self.longest_chunk, count)
            context = -(-(computed + count) // self.block_size) * self.block_size
            self.longest_context = max(self.longest_context, context)
        return count


class Engine:
    """Runs requests through a LanguageHalf over one paged KV cache. Not thread-safe: one
    scheduler loop owns it."""

    def __init__(self, half: LanguageHalf, cache: PagedKVCache,
                 settings: EngineSettings | None = None, max_running: int = 64,
                 prefix_cache: bool = False) -> None:
        self.half = half
        self.settings = settings or EngineSettings()
        self.max_running = max_running
        self.blocks = KVBlockManager(cache.num_blocks, cache.block_size, prefix_cache)
        self.runner = ModelRunner(half, cache)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.preemptions = 0
        self.stepped_tokens = 0  # by the last step: 0 when nothing it runs had rows ready
        self.prefilled_while_arriving = 0  # prompt tokens, before the rest of theirs landed
        self.prefix_query_tokens = self.prefix_hit_tokens = 0  # of prompts at first admission
        # NOTE: a sequence never outgrows the cache: it ends ("length") before it would.
        self.max_len = min(half.max_model_len, self.blocks.max_sequence_tokens)

    @classmethod
    def build(cls, half: LanguageHalf, settings: EngineSettings, max_running: int) -> Engine:
        """An engine with a KV cache sized by ``settings`` (see ``kv_memory``)."""
        return cls(half, build_kv_cache(half, settings), settings, max_running,
                   prefix_cache=settings.prefix_cache)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, req: Req) -> None:
        """A request whose prompt is here, or arriving (``landed_tokens``: prefill goes as far
        as its rows); it waits for KV blocks. ``InputError`` if it can never run."""
        check_params(req.params, self.half.vocab_size)
        problem = self.length_problem(req.prompt_tokens)
        if problem is not None:
            raise InputError(problem)
        if req.prompt.prefix is not None:
            self.blocks.adopt(req, req.prompt.prefix)
        req.seed = request_seed(req.params, req.index)
        if req.grammar is not None and req.matcher is None:
            req.matcher = new_matcher(req.grammar)
        req.status = ReqStatus.WAITING
        self.waiting.append(req)

    def length_problem(self, prompt_tokens: int) -> str | None:
        """Why a prompt of ``prompt_tokens`` can never run here (for the client), or None."""
        if prompt_tokens < 1:
            return "the prompt is empty"
        if prompt_tokens >= self.half.max_model_len:
            return (f"the prompt is {prompt_tokens} tokens; this model takes fewer than "
                    f"{self.half.max_model_len} (prompt and output together)")
        if prompt_tokens >= self.blocks.max_sequence_tokens:
            return (f"the prompt is {prompt_tokens} tokens; this language server's KV cache "
                    f"holds {self.blocks.max_sequence_tokens} tokens for one sequence (prompt "
                    "and output together)")
        return None

    def abort(self, req: Req) -> bool:
        """Drop ``req`` wherever it is here and free its blocks; False if it was not here."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        else:
            return False
        self._release(req)
        return True

    def step(self) -> list[StepOutput]:
        failed: list[StepOutput] = []
        decode = self._grow_decoding(failed)
        decode = decode[:self.runner.fitting(decode)]
        prefill = self._schedule_prefill(failed)
        self.stepped_tokens = len(decode) + sum(count for _, count in prefill)
        if not decode and not prefill:
            return failed
        sampled_tokens = self.runner.run(decode, prefill)
        for req in decode:
            req.num_computed += 1
        for req, count in prefill:
            if req.landed_tokens is not None:
                self.prefilled_while_arriving += count
            req.num_computed += count
            if req.num_computed - count < req.prompt_tokens <= req.num_computed:
                self._index_prompt(req)
        sampled = [*decode, *(req for req, count in prefill if req.num_computed == req.num_tokens)]
        return failed + [self._emit(req, token, logprob) for req, token, logprob in zip(
            sampled, sampled_tokens.tokens, sampled_tokens.logprobs, strict=True)]

    # -- scheduling ------------------------------------------------------------------------

    def _grow_decoding(self, failed: list[StepOutput]) -> list[Req]:
        """Running requests whose next token is a decode, each given a slot for it; preempts
        the most recently admitted while blocks are short."""
        decode = []
        for req in list(self.running):
            if req.status is not ReqStatus.RUNNING or not self._decoding(req):
                continue
            while req.status is ReqStatus.RUNNING:
                try:
                    grown = self.blocks.allocate(req, req.num_tokens)
                except Exception as exc:  # an allocator failure fails this request only
                    failed.append(self._fail(req, f"could not grow the KV cache: {exc!r}"))
                    break
                if grown:
                    decode.append(req)
                    break
                self._preempt(self.running[-1])
        return decode

    @staticmethod
    def _decoding(req: Req) -> bool:
        return req.num_pending == 1 and req.num_computed >= req.prompt_tokens

    def _schedule_prefill(self, failed: list[StepOutput]) -> list[tuple[Req, int]]:
        """Next prompt (or recomputed) tokens of running requests, then of admitted ones,
        within the step's padded area (``PrefillArea``)."""
        area = PrefillArea(self.settings.max_prefill_tokens, self.settings.max_prefill_kv_tokens,
                           self.blocks.block_size)
        prefill = []
        for req in self.running:
            if not self._decoding(req) and req.num_ready:  # (0: its next rows are on the way)
                count = area.take(req.num_computed, req.num_ready)
                if count == 0:
                    return prefill
                prefill.append((req, count))
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            if not req.block_table:
                self._find_prefix(req)
            if req.num_computed < req.prompt.first_token:
                self.waiting.popleft()
                failed.append(self._fail(req, "its prompt's cached prefix was evicted while it "
                                              "waited (preempted); send it again", running=False))
                continue
            if area.fits(req.num_computed) == 0:
                break
            try:
                admitted = self.blocks.allocate(req, req.num_tokens + 1)
            except Exception as exc:  # an allocator failure fails this request only
                self.waiting.popleft()
                failed.append(self._fail(req, f"could not allocate KV blocks: {exc!r}",
                                         running=False))
                continue
            if not admitted:
                break
            self.waiting.popleft()
            self.blocks.mark_running(req)
            if req.preemptions == 0:
                self.prefix_query_tokens += req.prompt_tokens
                self.prefix_hit_tokens += req.num_computed
            req.status = ReqStatus.RUNNING
            self.running.append(req)
            if req.num_ready:
                prefill.append((req, area.take(req.num_computed, req.num_ready)))
        return prefill

    def _find_prefix(self, req: Req) -> None:
        """Start ``req`` from the longest cached prefix of its prompt, short of its last
        token (whose logits its prefill must compute)."""
        if not req.prompt.block_hashes:
            return
        hit = self.blocks.match(req.prompt.block_hashes, req.prompt_tokens - 1)
        if hit is not None:
            self.blocks.adopt(req, hit)

    def _preempt(self, req: Req) -> None:
        self.running.remove(req)
        self.blocks.free(req)
        self.runner.forget(req)
        req.status = ReqStatus.PREEMPTED
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)
        log.debug("preempted %s (%d tokens)", req.request_id, req.num_tokens)

    # -- results ---------------------------------------------------------------------------

    def _emit(self, req: Req, token: int,
              logprob: tuple[float, list[tuple[int, float]]] | None) -> StepOutput:
        req.output_ids.append(token)
        finish_reason = self._finish_reason(req, token)
        if finish_reason is not None:
            self.running.remove(req)
            self._index_generated(req)
            self._release(req)
            req.finish_reason = finish_reason
        return StepOutput(req, token, finish_reason, logprob=logprob)

    def _index_prompt(self, req: Req) -> None:
        """Keep the KV of ``req``'s prompt, once it is computed."""
        if self.blocks.prefix_caching:
            self.blocks.index(req, req.prompt.block_hashes, req.prompt.whole_token_ids())

    def _index_generated(self, req: Req) -> None:
        """Keep the KV of the tokens ``req`` generated (all but the last, which has none):
        a chat's next turn repeats them after this prompt."""
        if self.blocks.prefix_caching:
            generated = req.output_ids[: req.num_computed - req.prompt_tokens]
            self.blocks.index(req, req.prompt.hashes_with(generated),
                              req.prompt.whole_token_ids() + generated)

    def _fail(self, req: Req, error: str, running: bool = True) -> StepOutput:
        log.error("request %s failed: %s", req.request_id, error)
        if running:
            self.running.remove(req)
        self._release(req)
        req.finish_reason = "error"
        return StepOutput(req, -1, "error", error)

    def _release(self, req: Req) -> None:
        self.blocks.free(req)
        self.runner.forget(req)
        req.status = ReqStatus.FINISHED

    def _finish_reason(self, req: Req, token: int) -> str | None:
        params = req.params
        if token in params.stop_token_ids or (token in self.half.eos_token_ids
                                              and not params.ignore_eos):
            return "stop"
        if req.matcher is not None and req.matcher.is_terminated():  # the grammar is complete
            return "stop"
        if len(req.output_ids) >= params.max_tokens or req.num_tokens >= self.max_len:
            return "length"
        return None
