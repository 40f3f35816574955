"""Which KV-cache blocks each running request owns (its block table), and the prefix cache.

Block ids come from the project's ``BlockAllocator``, one block per allocation so that each can
go back on its own. A request is admitted with blocks for all its known tokens plus one, and
grows by a block when its next token would not fit.

Prefix cache: once a request has computed its prompt, each of its whole KV blocks is indexed
by the chain hash of the prompt's tokens up to the block's end (``core.block_hashes``, every
``HASH_BLOCK_TOKENS``); once it finishes, so are the blocks its generated tokens filled
(``EncodedPrompt.hashes_with``). A block counts its references (requests whose table holds it, and
pins of ``match``); at zero an indexed block is kept, least recently used first to go, until
a new allocation needs it. NOTE: a block is never rewritten while referenced, and never
found again once handed out anew (its index entry goes first).

NOTE: pins held by requests that are not running (a hit found when the prompt was announced,
held through its transfer and wait) are capped at a quarter of the blocks, and no sequence may
outgrow the other three quarters: so the request at the head of the queue always fits once
the running ones finish, whatever is pinned.

Thread-safe: ``match`` and ``release`` come from the transfer layer's thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from mmdisagg.core import HASH_BLOCK_TOKENS, PrefixHit
from mmdisagg.language.request import Req
from mmdisagg.pool.allocator import Allocation, BlockAllocator


@dataclass(frozen=True)
class KVStats:
    total_blocks: int
    used_blocks: int  # referenced by a request or a pin
    cached_blocks: int  # unreferenced, kept for the prefix cache: taken when needed
    free_blocks: int  # never used, or given back

    @property
    def available_blocks(self) -> int:
        return self.cached_blocks + self.free_blocks


class KVBlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = False) -> None:
        if prefix_cache and block_size % HASH_BLOCK_TOKENS:
            raise ValueError(f"the prefix cache needs a KV block size that is a multiple of "
                             f"{HASH_BLOCK_TOKENS} (got --kv-block-size {block_size}); or "
                             "--no-prefix-cache")
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size
        self.prefix_caching = prefix_cache
        self.pin_limit = num_blocks // 4 if prefix_cache else 0
        self._pinned = 0  # blocks pinned by requests that are not running
        self._lock = threading.RLock()
        self._refs: dict[int, int] = {}
        self._allocations: dict[int, Allocation] = {}
        self._index: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._token_ids: dict[int, list[int]] = {}  # of each indexed block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_tokens(self) -> int:
        """Tokens the whole cache holds."""
        return self.allocator.num_blocks * self.block_size

    @property
    def max_sequence_tokens(self) -> int:
        """Tokens one sequence may hold: all but what pins may take."""
        return (self.num_blocks - self.pin_limit) * self.block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take now: free, or cached and unreferenced."""
        return self.allocator.num_free_blocks + len(self._evictable)

    def blocks_missing(self, req: Req, num_tokens: int) -> int:
        """Blocks ``req`` lacks to hold ``num_tokens`` tokens."""
        return max(0, self.allocator.blocks_for(num_tokens) - len(req.block_table))

    def can_allocate(self, req: Req, num_tokens: int) -> bool:
        return self.blocks_missing(req, num_tokens) <= self.num_free_blocks

    def allocate(self, req: Req, num_tokens: int) -> bool:
        """Grow ``req``'s table to hold ``num_tokens`` tokens; False (nothing taken) if the
        blocks are not free."""
        missing = self.blocks_missing(req, num_tokens)
        if missing == 0:
            return True
        with self._lock:
            if missing > self.num_free_blocks:
                return False
            while self.allocator.num_free_blocks < missing:
                self._evict()
            allocations = self.allocator.alloc_each(missing, 1)
            if allocations is None:
                return False
            for allocation in allocations:
                block = allocation.blocks[0]
                self._allocations[block] = allocation
                self._refs[block] = 1
                req.block_table.append(block)
        return True

    def free(self, req: Req) -> None:
        """Every block of ``req``; its cached tokens are gone."""
        with self._lock:
            self._unref(req.block_table)
            self._pinned -= req.pinned_blocks
        req.pinned_blocks = 0
        req.block_table.clear()
        req.num_computed = 0

    def mark_running(self, req: Req) -> None:
        """``req`` runs: its pins are ordinary references now."""
        with self._lock:
            self._pinned -= req.pinned_blocks
        req.pinned_blocks = 0

    # -- the prefix cache -----------------------------------------------------------------

    def match(self, hashes: Sequence[bytes], max_tokens: int) -> PrefixHit | None:
        """Pin the blocks of the longest indexed prefix of a prompt whose ``block_hashes``
        these are, at most ``max_tokens`` tokens long (whole KV blocks)."""
        if not self.prefix_caching:
            return None
        with self._lock:
            blocks: list[int] = []
            for key in self._keys(hashes, max_tokens // self.block_size):
                block = self._index.get(key)
                if block is None or self._pinned + len(blocks) >= self.pin_limit:
                    break
                blocks.append(block)
            if not blocks:
                return None
            for block in blocks:
                self._refs[block] = self._refs.get(block, 0) + 1
                self._evictable.pop(block, None)
            self._pinned += len(blocks)
            token_ids = [token for block in blocks for token in self._token_ids[block]]
        return PrefixHit(len(blocks) * self.block_size, blocks, token_ids)

    def release(self, hit: PrefixHit) -> None:
        """Unpin a ``match`` that no request took."""
        with self._lock:
            self._unref(hit.blocks)
            self._pinned -= len(hit.blocks)

    def share(self, hit: PrefixHit) -> PrefixHit:
        """Another pin of ``hit``'s blocks: for another choice of the same prompt."""
        with self._lock:
            for block in hit.blocks:
                self._refs[block] += 1
            self._pinned += len(hit.blocks)
        return PrefixHit(hit.tokens, list(hit.blocks), hit.token_ids)

    def adopt(self, req: Req, hit: PrefixHit) -> None:
        """``req`` starts with ``hit``'s blocks (their pins become its references)."""
        if req.block_table:
            raise ValueError(f"request {req.request_id} already holds KV blocks")
        req.block_table.extend(hit.blocks)
        req.pinned_blocks = len(hit.blocks)
        req.num_computed = hit.tokens

    def index(self, req: Req, hashes: Sequence[bytes], token_ids: Sequence[int]) -> None:
        """Index the whole blocks ``req`` has computed of the tokens ``token_ids`` (from the
        prompt's first) whose ``hashes`` these are; a key already indexed keeps its block."""
        if not self.prefix_caching:
            return
        size = self.block_size
        with self._lock:
            keys = self._keys(hashes, min(req.num_computed, len(token_ids)) // size)
            for number, (key, block) in enumerate(zip(keys, req.block_table, strict=False)):
                if key not in self._index and block not in self._key_of:
                    self._index[key] = block
                    self._key_of[block] = key
                    self._token_ids[block] = list(token_ids[number * size:(number + 1) * size])

    def _keys(self, hashes: Sequence[bytes], num_blocks: int) -> list[bytes]:
        """The key of each of the first ``num_blocks`` KV blocks: the hash ending with it."""
        per_block = self.block_size // HASH_BLOCK_TOKENS
        return list(hashes[per_block - 1::per_block][:num_blocks])

    # -- bookkeeping ----------------------------------------------------------------------

    def _unref(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            refs = self._refs[block] - 1
            if refs:
                self._refs[block] = refs
                continue
            del self._refs[block]
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self.allocator.free(self._allocations.pop(block))

    def _evict(self) -> None:
        block, _ = self._evictable.popitem(last=False)
        del self._index[self._key_of.pop(block)]
        del self._token_ids[block]
        self.allocator.free(self._allocations.pop(block))

    def stats(self) -> KVStats:
        with self._lock:
            cached = len(self._evictable)
            free = self.allocator.num_free_blocks
            return KVStats(self.num_blocks, self.num_blocks - cached - free, cached, free)

    def check(self) -> None:
        """Integrity: the allocator's, and every used block referenced or cached."""
        with self._lock:
            self.allocator.check()
            held = set(self._refs) | set(self._evictable)
            if held != set(self._allocations) or set(self._refs) & set(self._evictable):
                raise AssertionError("KV blocks referenced, cached and allocated disagree")
            if any(self._index[key] != block for block, key in self._key_of.items()):
                raise AssertionError("the prefix index and its blocks disagree")
