"""Structured outputs: a ``GrammarSpec`` compiled by xgrammar for one tokenizer, and the
whole-batch token mask that keeps each constrained row inside its grammar.

Compiled grammars are cached by spec (a schema sent again compiles once). Each request gets
its own matcher (its position in the grammar); one ``GrammarMask`` per engine fills the
bitmasks of every constrained row in one call and applies them to the logits in one op.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xgr

from mmdisagg.core import GrammarSpec
from mmdisagg.models.errors import InputError

CACHED_GRAMMARS = 256
LOOSE_CHARACTER = r'[^\"\\\r\n]'
JSON_CHARACTER = r'[^\0-\x1f\"\\]'


class GrammarCompiler:
    """Compiles specs against one tokenizer whose logits have ``vocab_size`` columns; the
    grammar ends with one of ``stop_token_ids``."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._compiled: OrderedDict[GrammarSpec, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()  # NOTE: HTTP handlers compile on a thread pool
        self.vocab_size = vocab_size

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """InputError (a 400 for the client) when the schema cannot be compiled."""
        with self._lock:
            compiled = self._compiled.get(spec)
            if compiled is None:
                compiled = self._compiler.compile_grammar(_grammar(spec))
                self._compiled[spec] = compiled
                if len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
            self._compiled.move_to_end(spec)
            return compiled

    def matcher(self, spec: GrammarSpec) -> xgr.GrammarMatcher:
        return new_matcher(self.compile(spec))


def new_matcher(compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
    """One request's place in a compiled grammar, at its start."""
    return xgr.GrammarMatcher(compiled)


def _grammar(spec: GrammarSpec) -> xgr.Grammar:
    try:
        schema = json.loads(spec.json_schema)
        # NOTE: compact JSON: with any whitespace allowed, a weak model can pad forever.
        grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False)
        # NOTE: xgrammar lets a string with a length bound hold raw control characters, which
        # JSON forbids (json.loads refuses them): exclude them as its other strings do.
        grammar = xgr.Grammar.from_ebnf(str(grammar).replace(LOOSE_CHARACTER, JSON_CHARACTER))
    except (ValueError, RuntimeError, TypeError) as exc:
        raise InputError(f"the JSON schema cannot be used for structured output: {exc}") from None
    pieces = [_literal(spec.begin), grammar, _literal(spec.end)]
    return xgr.Grammar.concat(*(piece for piece in pieces if piece is not None))


def _literal(text: str) -> xgr.Grammar | None:
    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}") if text else None


class GrammarMask:
    """Masks the logits of constrained rows and advances their matchers, a batch at a time."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._batch = xgr.BatchGrammarMatcher(max_threads=1)

    def apply(self, logits: torch.Tensor, matchers: Sequence[xgr.GrammarMatcher | None]
              ) -> None:
        """Forbid, in place, every token of ``logits [b, vocab]`` that row i's matcher (None:
        unconstrained) does not allow next."""
        rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
        if not rows:
            return
        bitmask = xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        self._batch.batch_fill_next_token_bitmask([matchers[row] for row in rows], bitmask)
        constrained = logits[rows]
        xgr.apply_token_bitmask_inplace(constrained, bitmask.to(logits.device),
                                        vocab_size=self.vocab_size)
        logits[rows] = constrained

    def accept(self, matchers: Sequence[xgr.GrammarMatcher | None], tokens: Sequence[int]
               ) -> None:
        """Advance each constrained row's matcher by its sampled token."""
        pairs = [(matcher, token) for matcher, token in zip(matchers, tokens, strict=True)
                 if matcher is not None and not matcher.is_terminated()]
        if pairs:
            accepted = self._batch.batch_accept_token([m for m, _ in pairs], [t for _, t in pairs])
            if not all(accepted):
                raise RuntimeError("a sampled token broke its grammar: the mask was not applied")
