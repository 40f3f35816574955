"""Read only the tensors a model half needs from a checkpoint's safetensors files."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


class MissingWeightError(RuntimeError):
    """The checkpoint lacks a tensor that a model half needs."""


class CheckpointWeights:
    """The tensor names of a checkpoint folder (one safetensors file or a sharded index), with
    selective loading: a tensor is read from disk only when a module asks for it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / SHARD_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.folder / file for name, file in weight_map.items()}
        elif (self.folder / SINGLE_FILE).is_file():
            with safe_open(self.folder / SINGLE_FILE, framework="pt") as handle:
                self._file_of = {name: self.folder / SINGLE_FILE for name in handle.keys()}  # noqa: SIM118
        else:
            raise FileNotFoundError(f"{self.folder}: no {SINGLE_FILE} or {SHARD_INDEX}")

    def names(self) -> frozenset[str]:
        return frozenset(self._file_of)

    def load_into(self, module: nn.Module, prefixes: Sequence[str], *, needed_by: str,
                  dtype: torch.dtype, device: torch.device,
                  converters: Mapping[str, Callable[[torch.Tensor, torch.Size], torch.Tensor]]
                  | None = None) -> dict[str, torch.Tensor]:
        """Give every parameter and persistent buffer of ``module`` (which may live on the meta
        device) its tensor from the checkpoint, named ``prefix + name`` for the first prefix that
        the checkpoint has; ``converters``: tensor name suffix -> what turns the checkpoint's
        tensor into one of the module's shape (a layout the Hub stores otherwise). Returns
        checkpoint name -> tensor as held; raises MissingWeightError naming the first tensor it
        cannot find."""
        wanted = module.state_dict()
        chosen = {name: self._find(name, prefixes, needed_by) for name in wanted}
        shapes = {chosen[name]: tensor.shape for name, tensor in wanted.items()}
        by_file: dict[Path, list[str]] = defaultdict(list)
        for checkpoint_name in chosen.values():
            by_file[self._file_of[checkpoint_name]].append(checkpoint_name)
        loaded: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            with safe_open(file, framework="pt", device=str(device)) as handle:
                for name in names:
                    tensor = handle.get_tensor(name)
                    for suffix, convert in (converters or {}).items():
                        if name.endswith(suffix):
                            tensor = convert(tensor, shapes[name]).contiguous()
                    loaded[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        module.load_state_dict({name: loaded[chosen[name]] for name in chosen}, assign=True)
        return loaded

    def _find(self, name: str, prefixes: Sequence[str], needed_by: str) -> str:
        candidates = [prefix + name for prefix in prefixes]
        for candidate in candidates:
            if candidate in self._file_of:
                return candidate
        raise MissingWeightError(
            f"checkpoint {self.folder} has no tensor {' or '.join(map(repr, candidates))}, "
            f"which the {needed_by} needs")
