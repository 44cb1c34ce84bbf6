"""Next-token choice from logits: greedy, or sampling with temperature and top-p (as model.generate)."""

import torch


class TokenChooser:
    """Greedy (``do_sample=False``) or temperature + nucleus sampling.

    Args:
        do_sample: sample instead of taking the argmax.
        temperature: > 0, divides the logits before sampling.
        top_p: in (0, 1]; keep the smallest set of most likely tokens whose probability reaches top_p.
    """

    def __init__(self, do_sample, temperature, top_p):
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p

    def probs(self, logits):
        """Sampling distribution, float32 [..., V], for logits [..., V]."""
        z = logits.float() / self.temperature
        if self.top_p < 1.0:
            sorted_z, order = torch.sort(z, dim=-1, descending=True)
            p = sorted_z.softmax(-1)
            # Drop a token when the mass strictly before it already reaches top_p (the top one always stays).
            drop = (p.cumsum(-1) - p) >= self.top_p
            sorted_z = sorted_z.masked_fill(drop, float("-inf"))
            z = torch.empty_like(z).scatter_(-1, order, sorted_z)
        return z.softmax(-1)

    def __call__(self, logits):
        """logits [N, V] -> tokens int64 [N]."""
        if not self.do_sample:
            return logits.argmax(-1)
        return torch.multinomial(self.probs(logits), 1).squeeze(-1)
