"""The frequencies ``model.generate`` gives each position under a rotary embedding that follows the call's length.

Two rotary types change their frequencies with the length of each call (transformers reads it from
the call's last position): longrope (Phi-3-128k, Phi-3.5/4-mini) takes its short factors while the
length stays within the original context C (``original_max_position_embeddings``) and its long ones
past it; dynamic NTK grows its base with the length past C and keeps the longest length seen as
state of the module. ``model.generate`` runs the batch in lock step: the prompt in one call, then
one position per step, so the step that processes a generated position p of row r has the length
p + 1 + (M - P_r), with P_r the row's real prompt tokens and M their maximum; the prompt's call has
length M. When a longrope prompt fits in C, Phi-3's ``prepare_inputs_for_generation`` also drops the
cache at the first step past C and recomputes the whole sequence, so from then on every cached key
carries the long factors.

The early-exit loops process positions out of lock step (exact mode's rows accept different numbers
of drafts; a verification runs a block of positions in one call), so they give each position the
length of its lock-step call (:meth:`LockStepRope.lengths`, read through
``RowCache.rope_lengths`` by the forwards, turned into tables by ``ModelAdapter.rotary``), and for
longrope reproduce the recompute row by row: a row's cache is rebuilt with the long factors at full
depth before the row processes its first long position (:meth:`LockStepRope.due`), and no block of
positions straddles that point (:meth:`LockStepRope.room`).
"""

import torch

#: No limit on how many positions a call may process (:meth:`LockStepRope.room`).
UNLIMITED = 1 << 62


class LockStepRope:
    """Lock-step lengths of one generate call's positions.

    Args:
        rope_type: "longrope" or "dynamic".
        original: C, the rotary embedding's original context.
        prompt_mask: [B, T] the prompt's attention mask (1 = token), as given to generate.
        floor: dynamic NTK: the longest length the module holds after the prompt's call (its
            ``max_seq_len_cached``); shorter lengths take that one's frequencies, as in generate.
    """

    def __init__(self, rope_type, original, prompt_mask, floor=0):
        self.rope_type = rope_type
        self.original = original
        self.floor = floor
        self.prompt = prompt_mask.long().sum(1)  # P_r, int64 [B]
        self.longest = int(self.prompt.max())  # M
        self.shift = self.longest - self.prompt
        # generate recomputes a longrope cache at width C + 1 when the prompt fits; the recompute uses
        # the long factors only if a row without left padding reaches C + 1 there (else it changes nothing).
        recompute = rope_type == "longrope" and self.longest == prompt_mask.shape[1] <= original
        #: Per row: its first long position, from which on its whole cache carries the long factors
        #: (None: no row is ever rebuilt; each position keeps the frequencies it was computed with).
        self.switch = original - self.shift if recompute else None
        #: Rows whose cache has been rebuilt with the long factors, bool [B].
        self.rebuilt = torch.zeros_like(self.prompt, dtype=torch.bool)

    def lengths(self, pos):
        """The length whose frequencies each of the positions pos [B, q] (int64, one row per batch row)
        takes: that of its lock-step call, at least ``floor``; int64 [B, q]."""
        generated = pos + 1 + self.shift[:, None]
        return torch.where(pos < self.prompt[:, None], self.longest, generated).clamp(min=self.floor)

    def due(self, next_pos, running):
        """Rows to rebuild before they process next_pos [B] (int64, each row's next position): bool [B]."""
        if self.switch is None:
            return torch.zeros_like(running)
        return running & ~self.rebuilt & (next_pos >= self.switch)

    def room(self, next_pos, running):
        """Most positions after next_pos [B] a call may process in every running row without one
        reaching its switch before its cache is rebuilt (an int; :data:`UNLIMITED` when none is near)."""
        if self.switch is None:
            return UNLIMITED
        ahead = running & ~self.rebuilt & (next_pos < self.switch)
        if not bool(ahead.any()):
            return UNLIMITED
        return int((self.switch - 1 - next_pos)[ahead].min())

    def last_length(self, generated):
        """The length of model.generate's last call when the longest row generated ``generated`` tokens."""
        return self.longest + max(generated, 1) - 1
