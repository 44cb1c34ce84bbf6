"""Next-token choice from logits: greedy, or sampling with temperature, top-k, top-p and min-p (as model.generate)."""

import torch


class TokenChooser:
    """Greedy (``do_sample=False``) or sampling from the logits filtered as transformers' warpers filter them.

    In model.generate's order: the logits divided by ``temperature``, then the ``top_k`` most likely
    tokens kept (and every token tied with the k-th), then the smallest set of most likely tokens
    whose probability reaches ``top_p``, then the tokens whose probability is at least ``min_p``
    times the most likely one's; the most likely token always stays.

    Args:
        do_sample: sample instead of taking the argmax.
        temperature: > 0. top_p: in (0, 1] (1: off). top_k: int >= 0 (0: off). min_p: in [0, 1] (0: off).
    """

    def __init__(self, do_sample, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0):
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.min_p = min_p

    def probs(self, logits):
        """Sampling distribution, float32 [..., V], for logits [..., V]."""
        z = logits.float().reshape(-1, logits.shape[-1])
        if self.temperature != 1.0:
            z = z / self.temperature
        if self.top_k:
            kth = torch.topk(z, min(self.top_k, z.shape[-1])).values[:, -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        if self.top_p < 1.0:
            # transformers' formulation (ascending cumulative mass), so the kept set matches it bit for bit.
            sorted_z, order = torch.sort(z, descending=False)
            drop = sorted_z.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[:, -1] = False
            z = z.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        if self.min_p > 0.0:
            p = z.softmax(-1)
            z = z.masked_fill(p < self.min_p * p.amax(-1, keepdim=True), float("-inf"))
        return z.softmax(-1).view(logits.shape)

    def __call__(self, logits):
        """logits [N, V] -> tokens int64 [N]."""
        if not self.do_sample:
            return logits.argmax(-1)
        return torch.multinomial(self.probs(logits), 1).squeeze(-1)
