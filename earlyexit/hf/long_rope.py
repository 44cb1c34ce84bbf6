"""Where ``model.generate`` switches a longrope rotary embedding (Phi-3-128k, Phi-3.5/4-mini) to its long factors.

A longrope rotary uses its short factors while a call's sequence stays within the original context
C (``original_max_position_embeddings``) and its long factors past it; transformers picks one set
per call from the call's longest position. ``model.generate`` runs the batch in lock step: the
prompt in one call, then one position per step, so the step that processes a generated position
p of row r sees the global length p + 1 + (M - P_r), with P_r the row's real prompt tokens and
M their maximum over the batch. When the prompt fits in C, Phi-3's ``prepare_inputs_for_generation``
drops the cache at the first step past C and recomputes the whole sequence, so from then on every
cached key carries the long factors too.

The early-exit loops process positions out of lock step (exact mode's rows accept different
numbers of drafts; a verification runs a block of positions in one call), so they choose the
factors per position with the rule above (:meth:`LongRope.long`) and reproduce the recompute row
by row: a row's cache is rebuilt with the long factors at full depth before the row processes its
first long position (:meth:`LongRope.due`), and no block of positions straddles that point
(:meth:`LongRope.room`).
"""

import torch


class LongRope:
    """``model.generate``'s longrope factor choice for one batch.

    Args:
        original: C, the rotary embedding's original context.
        prompt_mask: [B, T] the prompt's attention mask (1 = token), as given to generate.
    """

    def __init__(self, original, prompt_mask):
        self.original = original
        self.prompt = prompt_mask.long().sum(1)  # P_r, int64 [B]
        longest = int(self.prompt.max())
        self.shift = longest - self.prompt
        self.long_prompt = longest > original
        # generate recomputes the cache at width C + 1 when the prompt fits; the recompute uses the long
        # factors only if a row without left padding reaches C + 1 there (else it changes nothing).
        recompute = prompt_mask.shape[1] <= original and longest == prompt_mask.shape[1]
        #: Per row: its first long position, from which on its whole cache carries the long factors
        #: (None: no row is ever rebuilt; each position keeps the factors it was computed with).
        self.switch = original - self.shift if recompute else None
        #: Rows whose cache has been rebuilt with the long factors, bool [B].
        self.rebuilt = torch.zeros_like(self.prompt, dtype=torch.bool)

    def long(self, pos):
        """Which of the positions pos [B, q] (int64, one row per batch row) use the long factors: bool [B, q]."""
        prompt = self.prompt[:, None]
        generated = pos + 1 + self.shift[:, None] > self.original
        return torch.where(pos < prompt, self.long_prompt, generated)

    def due(self, next_pos, running):
        """Rows to rebuild before they process next_pos [B] (int64, each row's next position): bool [B]."""
        if self.switch is None:
            return torch.zeros_like(running)
        return running & ~self.rebuilt & (next_pos >= self.switch)

    def room(self, next_pos, running):
        """Most positions after next_pos [B] a call may process in every running row without one
        reaching its switch before its cache is rebuilt (an int; a large one when none is near)."""
        if self.switch is None:
            return 1 << 62
        ahead = running & ~self.rebuilt & (next_pos < self.switch)
        if not bool(ahead.any()):
            return 1 << 62
        return int((self.switch - 1 - next_pos)[ahead].min())
