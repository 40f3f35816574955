"""Executes what the engine scheduled: builds one ``ForwardBatch`` (embeddings, positions, KV
slots, block tables and masks as whole-batch tensors), runs the language half over the paged
KV cache, and samples the next token of every sequence that reached its last token."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmdisagg.language.request import Req
from mmdisagg.language.sampler import Sampled, Sampler, SamplingBatch
from mmdisagg.models.base import ForwardBatch, LanguageHalf, PagedRows, PrefillRows
from mmdisagg.models.kv_cache import PagedKVCache


class ModelRunner:
    def __init__(self, half: LanguageHalf, cache: PagedKVCache,
                 sampler: Sampler | None = None) -> None:
        self.half = half
        self.cache = cache
        self.sampler = sampler or Sampler()
        self.device = half.device

    def run(self, decode: Sequence[Req], prefill: Sequence[tuple[Req, int]]) -> Sampled:
        """One step: ``decode`` rows feed their last output token; each prefill row its next
        ``count`` pending tokens. Returns the next token (and logprobs, where asked) of every
        decode row, then of every prefill row whose chunk ends its pending tokens, in order.

        NOTE: the caller has given every row the blocks for its new tokens, and advances
        ``num_computed`` afterwards."""
        order = None
        if decode and self.cache.decode is not None:
            rows = self.cache.decode.place(decode, [req.num_computed for req in decode],
                                           [req.block_table for req in decode])
            order = sorted(range(len(decode)), key=rows.__getitem__)
            decode = [decode[i] for i in order]
        sampled = self._run(decode, prefill)
        if order is None:
            return sampled
        back = [0] * len(order)
        for position, original in enumerate(order):
            back[original] = position
        back += range(len(order), len(sampled.tokens))
        return Sampled([sampled.tokens[i] for i in back], [sampled.logprobs[i] for i in back])

    def fitting(self, decode: Sequence[Req]) -> int:
        """How many of the first ``decode`` rows one step can take: all, but on CPU those
        that fit the decode workspace padded to the longest (the others wait a step)."""
        if self.cache.decode is None:
            return len(decode)
        return self.cache.decode.fitting([req.num_computed + 1 for req in decode])

    def forget(self, req: Req) -> None:
        """``req`` stopped running (finished, failed, preempted): its KV blocks may change."""
        if self.cache.decode is not None:
            self.cache.decode.forget(req)

    def _run(self, decode: Sequence[Req], prefill: Sequence[tuple[Req, int]]) -> Sampled:
        batch = self._batch(decode, prefill)
        hidden = self.half.forward(batch, self.cache)
        finishing = [req for req, count in prefill if count == req.num_pending]
        reqs = [*decode, *finishing]
        if not reqs:
            return Sampled([], [])
        if len(finishing) < len(prefill):
            rows = [row for row, (req, count) in enumerate(prefill, start=len(decode))
                    if count == req.num_pending]
            hidden = hidden[torch.tensor([*range(len(decode)), *rows], device=self.device)]
        logits = self.half.logits(hidden)
        return self.sampler.sample(logits, SamplingBatch.of(
            reqs, logits.device, logits.shape[-1], self.half.eos_token_ids))

    def _batch(self, decode: Sequence[Req], prefill: Sequence[tuple[Req, int]]) -> ForwardBatch:
        embeddings, positions, slots, counts, visual = [], [], [], [], []
        if decode:
            embeddings.append(self.half.embed(torch.tensor([req.output_ids[-1]
                                                            for req in decode])))
            steps = torch.tensor([req.num_computed + req.prompt.mrope_delta for req in decode],
                                 device=self.device)
            positions.append(steps[:, None].expand(-1, 3))
            slots.append(self._slots(decode, [req.num_computed for req in decode]))
            counts += [1] * len(decode)
        for req, count in prefill:
            chunk, chunk_positions = req.pending_embeddings(count, self.half.embed)
            embeddings.append(chunk.to(self.device, self.half.dtype))
            positions.append(chunk_positions.to(self.device))
            first = req.num_computed - req.prompt.first_token  # of the prompt's rows
            deepstack = req.prompt.deepstack_rows(first, first + count)
            if deepstack is not None:
                visual.append((sum(counts) + deepstack[0], deepstack[1]))
            counts.append(count)
        if prefill:
            slots.append(self._prefill_slots(prefill))
        last_rows = torch.tensor(counts, device=self.device).cumsum(0) - 1
        return ForwardBatch(
            embeddings=torch.cat(embeddings) if len(embeddings) > 1 else embeddings[0],
            positions=torch.cat(positions) if len(positions) > 1 else positions[0],
            slots=torch.cat(slots) if len(slots) > 1 else slots[0],
            last_rows=last_rows,
            decode=self._decode_rows(decode) if decode else None,
            prefill=self._prefill_rows(prefill) if prefill else None,
            visual_rows=torch.cat([rows for rows, _ in visual]).to(self.device) if visual else None,
            deepstack=torch.cat([rows for _, rows in visual], dim=1).to(
                self.device, self.half.dtype) if visual else None)

    def _slots(self, reqs: Sequence[Req], tokens: Sequence[int]) -> torch.Tensor:
        """KV slot of token ``tokens[i]`` of ``reqs[i]``."""
        size = self.cache.block_size
        return torch.tensor([req.block_table[t // size] * size + t % size
                             for req, t in zip(reqs, tokens, strict=True)], device=self.device)

    def _prefill_slots(self, prefill: Sequence[tuple[Req, int]]) -> torch.Tensor:
        size = self.cache.block_size
        starts = torch.tensor([req.num_computed for req, _ in prefill])
        counts = torch.tensor([count for _, count in prefill])
        rows = torch.repeat_interleave(torch.arange(len(prefill)), counts)
        tokens = torch.arange(int(counts.sum())) - (counts.cumsum(0) - counts)[rows] + starts[rows]
        tables = self._tables([req for req, _ in prefill])
        slots = tables[rows, tokens // size] * size + tokens % size
        return slots.to(self.device)

    def _tables(self, reqs: Sequence[Req], width: int | None = None) -> torch.Tensor:
        """Block tables padded to ``width`` (default: the longest) with block 0."""
        width = width or max(len(req.block_table) for req in reqs)
        return torch.tensor([req.block_table[:width] + [0] * (width - len(req.block_table))
                             for req in reqs])

    def _width(self, ends: Sequence[int]) -> int:
        """Blocks covering the longest of ``ends`` tokens."""
        return -(-max(ends) // self.cache.block_size)

    def _decode_rows(self, decode: Sequence[Req]) -> PagedRows:
        lengths = [req.num_computed + 1 for req in decode]
        width = self._width(lengths)
        keys = torch.arange(width * self.cache.block_size, device=self.device)
        mask = keys[None, :] < torch.tensor(lengths, device=self.device)[:, None]
        return PagedRows(self._tables(decode, width).to(self.device), mask[:, None, None, :])

    def _prefill_rows(self, prefill: Sequence[tuple[Req, int]]) -> PrefillRows:
        counts = [count for _, count in prefill]
        width = self._width([req.num_computed + count for req, count in prefill])
        max_query = max(counts)
        keys = torch.arange(width * self.cache.block_size, device=self.device)
        starts = torch.tensor([req.num_computed for req, _ in prefill], device=self.device)
        last_visible = starts[:, None] + torch.arange(max_query, device=self.device)[None, :]
        mask = keys[None, None, :] <= last_visible[:, :, None]
        counts_tensor = torch.tensor(counts, device=self.device)
        rows = torch.repeat_interleave(torch.arange(len(prefill), device=self.device),
                                       counts_tensor)
        offsets = (torch.arange(int(sum(counts)), device=self.device)
                   - (counts_tensor.cumsum(0) - counts_tensor)[rows])
        return PrefillRows(self._tables([req for req, _ in prefill], width).to(self.device),
                           mask[:, None], rows * max_query + offsets, max_query)
