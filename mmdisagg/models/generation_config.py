"""Sampling defaults from a checkpoint's ``generation_config.json``, as vLLM applies them.

Qwen2-VL/2.5-VL Instruct checkpoints ship near-greedy defaults (temperature 0.1, top_p 0.001,
top_k 1, repetition_penalty 1.05); a request that leaves a field out gets the checkpoint's
value, not the sampler's neutral one. ``do_sample`` is ignored, as vLLM ignores it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mmdisagg.config import GENERATION_CONFIG_KEYS, GenerationSettings

log = logging.getLogger(__name__)


def sampling_defaults(model_path: str | Path, settings: GenerationSettings) -> dict[str, float]:
    """The defaults to apply: the checkpoint's (``auto``) or none, then the overrides."""
    found: dict[str, float] = {}
    config_file = Path(model_path) / "generation_config.json"
    if settings.generation_config == "auto" and config_file.is_file():
        config = json.loads(config_file.read_text())
        found = {key: config[key] for key in GENERATION_CONFIG_KEYS
                 if isinstance(config.get(key), int | float)
                 and not isinstance(config.get(key), bool)}
    defaults = found | settings.overrides
    log.info("sampling defaults for requests that leave them out: %s (generation config: %s%s)",
             json.dumps(defaults) if defaults else "none",
             settings.generation_config,
             ", overridden" if settings.overrides else "")
    return defaults
