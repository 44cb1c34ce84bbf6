"""A transformers ``DynamicCache`` that decoder layers can update on a subset of batch rows.

Early exit breaks the usual cache contract: at a given layer only some rows of the batch compute
the new position, the others get their key/value states later from state propagation. So each
forward first *reserves* the new positions for every row of every layer (zeros, appended with the
public ``DynamicCache.update``), and every writer then fills its rows in place:

- decoder layers, through :meth:`RowCache.view` (the object passed as the layers' cache argument),
  write their rows and read back those rows' keys/values;
- state propagation writes the skipped layers of exited rows with :meth:`RowCache.write`.

The storage stays a plain ``DynamicCache`` ([B, H_kv, S, D] per layer, ``cache.layers[i].keys``),
so it can be inspected or cropped with the public API.
"""

import torch
from transformers import DynamicCache

from earlyexit import scatter_rows


class RowCache:
    """Row-addressable wrapper around a ``DynamicCache`` with one row per sequence of the batch.

    Args:
        num_layers: decoder layers of the model.
        batch: B, rows of the batch.
        num_kv_heads, head_dim: per-layer key/value shape.
        dtype, device: of the cached states.
    """

    def __init__(self, num_layers, batch, num_kv_heads, head_dim, dtype, device):
        # No config: every layer is a full DynamicLayer, so position i of the cache is position i of
        # the sequence even for sliding-window layers (the window is applied by the attention mask).
        self.cache = DynamicCache()
        self.num_layers = num_layers
        self._shape = (batch, num_kv_heads, head_dim)
        self._dtype, self._device = dtype, device
        self.reserved = 0
        #: None, or for a rotary whose frequencies follow the call's length the length each position
        #: takes them from: a callable position_ids [B, q] -> int64 [B, q]
        #: (:meth:`~earlyexit.hf.lock_step_rope.LockStepRope.lengths`), read by the forwards that
        #: compute these rows' keys.
        self.rope_lengths = None

    @property
    def length(self):
        """Cached positions, reserved ones included."""
        return self.cache.get_seq_length()

    def reserve(self, q):
        """Append q positions (zeros) to every layer; forwards then fill them row by row."""
        b, h, d = self._shape
        zeros = torch.zeros(b, h, q, d, dtype=self._dtype, device=self._device)
        for idx in range(self.num_layers):
            self.cache.update(zeros, zeros, idx)
        self.reserved = q

    def crop(self, tokens_to_remove):
        """Drop the last ``tokens_to_remove`` positions of every layer (no-op for 0)."""
        if tokens_to_remove > 0:
            # A negative argument means "remove this many" in every transformers version that has crop.
            self.cache.crop(-tokens_to_remove)

    def compact(self, mask):
        """Drop masked positions along the sequence axis: each row's real positions, in order, move right.

        mask: [B, S] (1 = a token of the row, 0 = padding or a hole), S == ``length``, between forwards
        (nothing reserved is still to be written). Rows become left-padded to S' = the most real
        positions of any row; entries keep their values, so attention (which reads positions from
        the mask) sees the same keys.

        Returns:
            the new mask [B, S'] (same dtype).
        """
        if mask.dim() != 2 or mask.shape[1] != self.length:
            raise ValueError(
                f"mask: expected [B, {self.length}] (one entry per cached position), got {tuple(mask.shape)}"
            )
        keep = mask.shape[1] - int(mask.sum(1).max())
        # A stable sort on the mask puts each row's masked positions first and its real ones after, in order.
        order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices[:, keep:]
        for layer in self.cache.layers:
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, index)
            layer.values = layer.values.gather(2, index)
        self.reserved = 0
        return mask.gather(1, order)

    def write(self, idx, rows, keys, values):
        """Fill the reserved positions of layer ``idx`` for ``rows``.

        rows: int64 [K] batch rows; keys, values: [K, H_kv, q, D] with q == the reserved count.
        """
        layer = self.cache.layers[idx]
        start = layer.keys.shape[-2] - self.reserved
        scatter_rows(layer.keys.narrow(2, start, self.reserved), rows, keys)
        scatter_rows(layer.values.narrow(2, start, self.reserved), rows, values)

    def view(self, rows):
        """The cache as seen by decoder layers running on ``rows`` (int64 [K]) or on all rows (None)."""
        return _RowView(self, rows)


class _RowView:
    """What a decoder layer's attention gets as its cache: ``update`` writes and reads its rows only."""

    def __init__(self, owner, rows):
        self.owner = owner
        self.rows = rows

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """key_states, value_states: [K, H_kv, q, D] for the view's rows -> their full [K, H_kv, S, D]."""
        owner = self.owner
        layer = owner.cache.layers[layer_idx]
        if self.rows is None:
            start = layer.keys.shape[-2] - owner.reserved
            layer.keys[:, :, start:] = key_states
            layer.values[:, :, start:] = value_states
            return layer.keys, layer.values
        owner.write(layer_idx, self.rows, key_states, value_states)
        # Gather by a known index: index_select needs no host synchronization (compact would, to learn K).
        return layer.keys.index_select(0, self.rows), layer.values.index_select(0, self.rows)
