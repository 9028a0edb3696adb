"""A preallocated KV cache shared by every decoder.

Why not transformers' ``DynamicCache``: it grows by ``torch.cat`` every step and
can only crop a suffix. Speculative decoders need to keep an *arbitrary* set of
positions after a tree step (the accepted branch), and to write scratch tokens
(FIRP's pseudo tokens) that never become part of the context. Holding all layers
in one tensor makes both of those a single indexed copy, whatever the number of
layers, so the cost does not depend on the method.
"""

from __future__ import annotations

import torch


class KVCache:
    """All layers' keys and values in two tensors of shape [layers, 1, kv_heads, capacity, head_dim].

    ``length`` counts committed tokens, identical in every layer. A forward pass writes
    its new tokens at ``[length, length + n)`` of each layer it runs; they are *pending*
    until the caller commits them (``commit`` / ``keep``) or simply lets the next forward
    overwrite them. Tokens added at a later layer (ephemeral tokens) land after the real
    ones of that step and are therefore never committed.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        capacity: int = 256,
    ) -> None:
        self.num_layers = num_layers
        self.shape_tail = (num_kv_heads, head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.length = 0
        self.keys = self._alloc(capacity)
        self.values = self._alloc(capacity)

    def _alloc(self, capacity: int, slots: int = 1) -> torch.Tensor:
        heads, dim = self.shape_tail
        return torch.empty(
            (self.num_layers, slots, heads, capacity, dim), dtype=self.dtype, device=self.device
        )

    @classmethod
    def batched(cls, like: KVCache, slots: int, capacity: int) -> KVCache:
        """A cache of ``slots`` sequences, [layers, slots, kv_heads, capacity, head_dim], shaped as ``like``.

        Its slots are handed out as ``view(slot)``: each is a ``KVCache`` of its own (its own
        length, the same methods), so a decoder runs on one slot exactly as it runs alone, while
        the batched pass (``methods.core.batch``) reads and writes every slot in one tensor."""
        cache = cls.__new__(cls)
        cache.num_layers, cache.shape_tail, cache.dtype, cache.device = like.num_layers, like.shape_tail, like.dtype, like.device
        cache.length = 0
        # zeros, not ``empty``: a step reads every slot up to the longest slot's length, masked; a
        # masked position still enters the product, and uninitialised memory can hold NaN (0 * NaN)
        cache.keys = cache._alloc(capacity, slots).zero_()
        cache.values = cache._alloc(capacity, slots).zero_()
        return cache

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def reserve(self, total: int) -> None:
        """Make room for ``total`` positions; called once per forward, before the layer loop."""
        if total <= self.capacity:
            return
        new_capacity = max(total, 2 * self.capacity)
        keys, values = self._alloc(new_capacity), self._alloc(new_capacity)
        # Copy the whole old buffer, not just the committed part: a layer loop that grows
        # the cache mid-pass (ephemeral tokens) still needs the pending tokens it wrote.
        old = self.capacity
        keys[:, :, :, :old] = self.keys
        values[:, :, :, :old] = self.values
        self.keys, self.values = keys, values

    def reset(self) -> None:
        self.length = 0

    # -- the interface transformers' attention modules call -------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: object, **__: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values after the committed context and return the whole span."""
        end = self.length + key_states.shape[2]
        self.keys[layer_idx, :, :, self.length : end] = key_states
        self.values[layer_idx, :, :, self.length : end] = value_states
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    # -- what decoders do after a forward ---------------------------------------------------
    def commit(self, n: int) -> None:
        """Accept the first ``n`` pending tokens as context (vanilla, chains, prefill)."""
        self.length += n

    def keep(self, indices: list[int], indices_t: torch.Tensor | None = None) -> None:
        """Accept the pending tokens at ``indices`` (in order), e.g. the accepted tree branch.

        A leading run ``0..k-1`` needs no copy; anything else is one gather over all layers
        (from ``indices_t`` when the caller has them on the device already: no host copy).
        """
        if indices == list(range(len(indices))):
            self.commit(len(indices))
            return
        src = (torch.tensor(indices, device=self.device) if indices_t is None else indices_t) + self.length
        end = self.length + len(indices)
        self.keys[:, :, :, self.length : end] = self.keys.index_select(3, src)
        self.values[:, :, :, self.length : end] = self.values.index_select(3, src)
        self.length = end

    def view(self, slot: int) -> SlotCache:
        """Slot ``slot`` of a cache allocated for several sequences, as a one-sequence cache of its own."""
        return SlotCache(self, slot)

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` committed tokens."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} of {self.length} cached tokens")
        self.length -= n


class SlotCache(KVCache):
    """One sequence's slot of a batched cache: views into the batch's tensors, its own length.

    It cannot grow (a view would come apart from the batch): the batch is sized for its
    longest request before decoding starts (``methods.core.batch.BatchEngine``)."""

    def __init__(self, batch: KVCache, slot: int) -> None:
        self.num_layers, self.shape_tail, self.dtype, self.device = batch.num_layers, batch.shape_tail, batch.dtype, batch.device
        self.length = 0
        self.slot = slot
        self.keys = batch.keys[:, slot:slot + 1]
        self.values = batch.values[:, slot:slot + 1]

    def reserve(self, total: int) -> None:
        if total > self.capacity:
            raise RuntimeError(f"a batch slot holds {self.capacity} positions, {total} were asked for: "
                               "size the batch for its longest request")
