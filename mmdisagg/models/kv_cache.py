"""Keys and values of one sequence, for every decoder layer."""

from __future__ import annotations

import torch


class KVCache:
    """Per-sequence attention cache, ``[layers, kv_heads, capacity, head_dim]`` for keys and for
    values. It grows by doubling, so appending a token is amortised O(1).

    NOTE: a forward pass calls ``reserve(n)``, then ``write`` once per layer for the same ``n``
    new tokens, then ``advance(n)``; ``length`` counts only tokens whose pass has finished.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, capacity: int = 64) -> None:
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self._keys = torch.empty(shape, dtype=dtype, device=device)
        self._values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self._keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._values.nbytes

    def reserve(self, num_tokens: int) -> None:
        needed = self.length + num_tokens
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        self._keys = self._grown(self._keys, capacity)
        self._values = self._grown(self._values, capacity)

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``[kv_heads, n, head_dim]`` new keys and values after the cached ones; return all
        of this layer's keys and values, new ones included."""
        end = self.length + keys.shape[1]
        self._keys[layer, :, self.length:end] = keys
        self._values[layer, :, self.length:end] = values
        return self._keys[layer, :, :end], self._values[layer, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def _grown(self, tensor: torch.Tensor, capacity: int) -> torch.Tensor:
        layers, heads, _, head_dim = tensor.shape
        grown = tensor.new_empty((layers, heads, capacity, head_dim))
        grown[:, :, :self.length] = tensor[:, :, :self.length]
        return grown
