"""The result types of the exit-check ops: :class:`ExitResult` (a decision) and :class:`ExitStats` (the
statistics of a vocabulary slice, which merge across slices and ranks before they decide)."""

from typing import NamedTuple

import torch


class ExitResult(NamedTuple):
    """Outputs of :func:`earlyexit.exit_check`, each shaped ``hidden.shape[:-1]``.

    token: int64 argmax of the logits (lowest index on ties; -1 for an invalid row).
    exit: bool, the row passes the threshold (never for an invalid row).
    confidence: float32 value of the chosen measure.
    max_prob, margin (p_top1 - p_top2), entropy (nats), lse (logsumexp of the logits): float32.
    A row is invalid when its hidden state or any of its logits is NaN/inf (-inf logits from a
    -inf bias are allowed) or it has no finite logit; its statistics are NaN.
    """

    token: torch.Tensor
    exit: torch.Tensor
    confidence: torch.Tensor
    max_prob: torch.Tensor
    margin: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor


class ExitStats(NamedTuple):
    """Softmax statistics of the logits of a set of vocabulary columns, per row (each field shaped like the rows).

    max_logit: float32, the largest logit (-inf when the slice has no finite logit).
    argmax: int64 global vocabulary id of max_logit, the lowest id on ties (-1 for an empty slice or an
        invalid row).
    second_logit: float32, the second largest logit, duplicates counted (-inf if none).
    sum_exp: float32, sum of exp(z - max_logit) (0 when no finite logit).
    sum_exp_z: float32, sum of exp(z - max_logit) * (z - max_logit).
    invalid: bool, the hidden row is not finite or a logit is NaN/+inf: the row will never exit.
    Slices merge exactly (:func:`earlyexit.merge_exit_stats`); :func:`earlyexit.finalize_exit_stats` decides.
    """

    max_logit: torch.Tensor
    argmax: torch.Tensor
    second_logit: torch.Tensor
    sum_exp: torch.Tensor
    sum_exp_z: torch.Tensor
    invalid: torch.Tensor
