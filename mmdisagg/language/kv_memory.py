"""How big the paged KV cache is: ``--kv-cache-memory`` bytes, or on CUDA the share of the
device ``--gpu-memory-utilization`` leaves once weights and a dry run's activations are in."""

from __future__ import annotations

import logging

import torch

from mmdisagg.config import EngineSettings
from mmdisagg.core import EncodedPrompt, SamplingParams
from mmdisagg.language.request import Req
from mmdisagg.language.runner import ModelRunner
from mmdisagg.models.base import LanguageHalf
from mmdisagg.models.kv_cache import PagedKVCache

log = logging.getLogger(__name__)


def build_kv_cache(half: LanguageHalf, settings: EngineSettings) -> PagedKVCache:
    """The language server's KV cache; logs its size in blocks and tokens."""
    memory = settings.kv_cache_bytes
    if half.device.type == "cuda" and settings.gpu_memory_utilization > 0:
        memory = cuda_kv_bytes(half, settings)
    cache = PagedKVCache.within(half.kv_layout, memory, settings.kv_block_size, half.device)
    log.info("KV cache: %d blocks of %d tokens = %d tokens, %.1f MiB on %s", cache.num_blocks,
             cache.block_size, cache.num_tokens, cache.nbytes / 2**20, half.device)
    return cache


def cuda_kv_bytes(half: LanguageHalf, settings: EngineSettings) -> int:
    """Device memory times the utilization, less what is in use after a dry run of the
    largest prefill step and that step's activation peak."""
    device = half.device
    tokens = settings.max_prefill_tokens
    probe = PagedKVCache(half.kv_layout, -(-tokens // settings.kv_block_size),
                         settings.kv_block_size, device)
    prompt = EncodedPrompt(torch.zeros(tokens, half.hidden_size, dtype=half.dtype, device=device),
                           torch.zeros(tokens, dtype=torch.long),
                           torch.arange(tokens, device=device)[:, None].expand(-1, 3))
    req = Req("dry-run", SamplingParams(), prompt, block_table=list(range(probe.num_blocks)))
    torch.cuda.reset_peak_memory_stats(device)
    ModelRunner(half, probe).run([], [(req, tokens)])
    torch.cuda.synchronize(device)
    activations = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
    del probe
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * settings.gpu_memory_utilization) - (total - free) - activations
    if budget <= 0:
        raise ValueError(f"--gpu-memory-utilization {settings.gpu_memory_utilization} of "
                         f"{total} bytes leaves nothing for the KV cache: {total - free} in use, "
                         f"{activations} for activations")
    return budget
