"""``mmdisagg bench pool``: block-wise scatter and gather against a plain copy of the same bytes.

The blocks are deliberately shuffled (non-contiguous, out of order), as a busy pool hands
them out.
"""

from __future__ import annotations

import argparse
import random

import torch

from mmdisagg.bench.timing import MB, gbps, median_seconds, print_table, save_json
from mmdisagg.pool.layout import PoolLayout
from mmdisagg.pool.pool import EmbeddingPool

# About 1 MB, 14 MB (2000 tokens x 3584 x bf16, as in SPEC §6) and 100 MB of embeddings.
DEFAULT_TOKENS = (140, 2000, 14000)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS),
                        help="payload sizes, in tokens")
    parser.add_argument("--hidden-size", type=int, default=3584)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--backing", default="shm", choices=("process", "shm"))
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", help="also write the results here")


def shuffled_allocation(pool: EmbeddingPool, num_tokens: int, seed: int = 0):
    """An allocation whose blocks are scattered across the pool in random order."""
    singles = [pool.allocator.alloc_blocks(1) for _ in range(pool.layout.num_blocks)]
    random.Random(seed).shuffle(singles)
    for single in singles:
        pool.allocator.free(single)
    return pool.allocator.alloc(num_tokens)


def measure(num_tokens: int, args: argparse.Namespace) -> dict:
    blocks = -(-num_tokens // args.block_size)
    layout = PoolLayout(blocks * 2, args.block_size, args.hidden_size, args.dtype)
    pool = EmbeddingPool(layout, backing=args.backing)
    try:
        allocation = shuffled_allocation(pool, num_tokens)
        embeddings = torch.randn(num_tokens, args.hidden_size).to(layout.torch_dtype)
        token_ids = torch.randint(0, 150_000, (num_tokens,), dtype=torch.int32)
        positions = torch.randint(0, 4096, (num_tokens, 3), dtype=torch.int32)
        num_bytes = num_tokens * layout.token_bytes
        src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8)
        dst = torch.empty_like(src)
        repeat = max(3, args.repeat if num_bytes < 50 * MB else args.repeat // 4)
        copy_s = median_seconds(lambda: dst.copy_(src), repeat)
        write_s = median_seconds(
            lambda: pool.write(allocation, 0, embeddings, token_ids, positions), repeat)
        out = pool.read(allocation, num_tokens)
        read_s = median_seconds(
            lambda: pool.arrays.read(allocation.blocks, num_tokens, out=out), repeat)
        exact = torch.equal(out.embeddings, embeddings) and torch.equal(out.token_ids, token_ids)
        return {
            "payload_MB": round(num_bytes / MB, 1), "tokens": num_tokens, "blocks": blocks,
            "copy_GBps": gbps(num_bytes, copy_s), "scatter_GBps": gbps(num_bytes, write_s),
            "gather_GBps": gbps(num_bytes, read_s),
            "scatter_vs_copy": copy_s / write_s, "gather_vs_copy": copy_s / read_s,
            "exact": exact,
        }
    finally:
        pool.close()


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    print(f"bench pool: hidden {args.hidden_size} {args.dtype}, block {args.block_size}, "
          f"{args.backing} backing, shuffled blocks, median of {args.repeat}")
    rows = []
    for num_tokens in args.tokens:
        rows.append(measure(num_tokens, args))
        print(f"  {num_tokens} tokens done", flush=True)
    print_table(rows, ["payload_MB", "tokens", "blocks", "copy_GBps", "scatter_GBps",
                       "gather_GBps", "scatter_vs_copy", "gather_vs_copy", "exact"])
    save_json(args.json, {"bench": "pool", "args": vars(args), "rows": rows})
    return 0 if all(row["exact"] for row in rows) else 1
