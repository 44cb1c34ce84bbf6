"""Per-row early exits in a hand-written PyTorch decoder: ExitHead, partition_rows and scatter_rows.

    python examples/custom_decoder.py [--threshold 0.99] [--train-steps 200] [--rows 8] [--quiet]

No transformers here: a small decoder written out below (RMSNorm, multi-head attention with a KV cache, MLP,
head tied to the embedding) is trained for 200 steps on a toy task (CPU, seconds), with a loss at every
layer so that its early layers learn to predict too. Half of the rows count up (3 4 5 6 ...: the
last token is enough), half repeat a random 5-token block (the model must look back): easy tokens leave
after a layer or two, the others go deeper.

Then greedy decoding, one token per row per step (the prompts have one length, so every row decodes the same
position), each row leaving the layer stack at its own exit point:

    after each layer i:  result = head(h)                               one fused kernel (earlyexit.ExitHead)
                         partition_rows(~result.exit, h, rows, tokens)  continuing rows first, exited rows last
                         scatter_rows(out, exited rows, their tokens)   results back to their original rows
                         state propagation for the exited rows          (see decode_step)
                         h = the continuing rows only                   layers i+1.. run on fewer rows

The script checks itself and exits non-zero when a check fails:
  1. with a threshold no row can reach, early-exit decoding equals plain full-depth greedy decoding of the
     same model (recomputed from scratch, no cache), token for token;
  2. every row's token equals the model's own head (final norm + tied embedding, plain torch) applied to
     that row's hidden state at its exit layer, and every row that exited early passed the threshold.
"""

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from earlyexit import ExitHead, partition_rows, scatter_rows

VOCAB, DIM, HEADS, LAYERS, MAX_LEN = 32, 48, 4, 6, 20
PROMPT_LEN, NEW_TOKENS, PERIOD = 8, 12, 5


# ----------------------------------------------------------------------------------------------------------
# The model: a plain pre-norm decoder
# ----------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def kv(self, x):
        """Keys and values of normed hidden states x [n, q, dim]: each [n, q, heads, head_dim]."""
        shape = (*x.shape[:-1], self.heads, self.head_dim)
        return self.k(x).view(shape), self.v(x).view(shape)

    def forward(self, x, cache=None, rows=None, start=0):
        """Causal attention of x [n, q, dim] at positions start..start+q-1.

        cache None: x is the whole sequence. Otherwise cache = (keys, values) of this layer, each
        [batch, MAX_LEN, heads, head_dim]; x belongs to the batch rows ``rows``, whose new keys and values are
        written at positions start..start+q-1 before attending over positions 0..start+q-1.
        """
        n, q, _ = x.shape
        keys, values = self.kv(x)
        if cache is not None:
            cache[0][rows, start : start + q] = keys
            cache[1][rows, start : start + q] = values
            keys, values = cache[0][rows, : start + q], cache[1][rows, : start + q]
        queries = self.q(x).view(n, q, self.heads, self.head_dim)
        causal = torch.ones(q, start + q, dtype=torch.bool).tril(diagonal=start)
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=causal
        )
        return self.o(out.transpose(1, 2).reshape(n, q, -1))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = RMSNorm(dim), Attention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, cache=None, rows=None, start=0):
        x = x + self.attn(self.norm1(x), cache, rows, start)
        return x + self.mlp(self.norm2(x))

    def write_kv(self, x, cache, rows, start):
        """State propagation: the keys and values this layer would cache for x [n, q, dim], without running it."""
        keys, values = self.attn.kv(self.norm1(x))
        cache[0][rows, start : start + x.shape[1]] = keys
        cache[1][rows, start : start + x.shape[1]] = values


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(MAX_LEN, DIM)
        self.layers = nn.ModuleList(Block(DIM, HEADS) for _ in range(LAYERS))
        self.norm = RMSNorm(DIM)  # the final norm; the head is tied to the embedding

    def embed_at(self, ids, start):
        """Token + position embeddings of ids [n, q] at positions start..start+q-1."""
        return self.embed(ids) + self.pos(torch.arange(start, start + ids.shape[1]))

    def logits(self, h):
        """The head in plain torch: final norm, then the tied embedding. [..., dim] -> [..., VOCAB]."""
        return F.linear(self.norm(h), self.embed.weight)

    def hidden_states(self, ids):
        """Full-depth forward of whole sequences ids [B, T], no cache: the hidden state after every layer."""
        h, states = self.embed_at(ids, 0), []
        for layer in self.layers:
            h = layer(h)
            states.append(h)
        return states

    def forward(self, ids):
        return self.logits(self.hidden_states(ids)[-1])


# ----------------------------------------------------------------------------------------------------------
# Toy task and training (a loss at every layer, through the one shared head)
# ----------------------------------------------------------------------------------------------------------


def toy_batch(n, length, generator):
    """n sequences [n, length]: even rows count up mod VOCAB, odd rows repeat a random PERIOD-token block."""
    start = torch.randint(0, VOCAB, (n, 1), generator=generator)
    counting = (start + torch.arange(length)) % VOCAB
    block = torch.randint(0, VOCAB, (n, PERIOD), generator=generator)
    repeating = block.repeat(1, -(-length // PERIOD))[:, :length]
    return torch.where(torch.arange(n)[:, None] % 2 == 0, counting, repeating)


def train(model, steps, generator, batch=32):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        ids = toy_batch(batch, MAX_LEN, generator)
        states = model.hidden_states(ids[:, :-1])
        # Later layers weigh more: the last layer should be the best, the first ones useful.
        weights = torch.arange(1, LAYERS + 1, dtype=torch.float32)
        losses = torch.stack([F.cross_entropy(model.logits(h).flatten(0, 1), ids[:, 1:].flatten()) for h in states])
        loss = (losses * weights).sum() / weights.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses.detach()


# ----------------------------------------------------------------------------------------------------------
# Decoding: plain full depth (the reference) and per-row early exit
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_full_depth(model, prompt, new_tokens):
    """Greedy decoding the plain way: every step runs the whole sequence through every layer, no cache."""
    ids = prompt
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1] :]


@torch.no_grad()
def decode_step(model, head, cache, tokens, pos):
    """One new token for every row of ``tokens`` [B] (the tokens at position ``pos``), each row leaving the
    layer stack at the first layer where ``head`` lets it exit (the last layer for those that never do).

    Returns (next tokens [B], exit layer per row [B] (0-based), each row's hidden state at its exit [B, dim]).
    """
    batch = tokens.shape[0]
    next_tokens = torch.empty_like(tokens)
    exit_layer = torch.empty_like(tokens)
    exit_state = torch.empty(batch, DIM)
    rows = torch.arange(batch)  # original row of each row still in the batch
    h = model.embed_at(tokens[:, None], pos)  # [n, 1, dim], n = rows still in the batch
    for i, layer in enumerate(model.layers):
        h = layer(h, cache[i], rows, pos)
        result = head(h[:, 0])  # one fused kernel: final norm + head + softmax statistics + threshold
        last = i == len(model.layers) - 1
        leaving = torch.ones_like(result.exit) if last else result.exit
        # Continuing rows first, leaving rows after them, each group in order (one call for all tensors).
        (h, rows, token), _, count = partition_rows(~leaving, h, rows, result.token)
        k = int(count)  # on a GPU this reads one number back per exit point
        gone = rows[k:]
        scatter_rows(next_tokens, gone, token[k:])
        scatter_rows(exit_layer, gone, torch.full_like(gone, i))
        scatter_rows(exit_state, gone, h[k:, 0])
        # State propagation: layers i+1.. never run for the rows leaving here, but later tokens attend to this
        # position in those layers. Their cache entries get the keys and values computed from the exit state
        # (norm + k/v projections only; no attention, no MLP), the usual choice (CALM, LayerSkip-style
        # decoders): cheap, but not the keys and values a full-depth pass would have cached.
        for j in range(i + 1, len(model.layers)):
            model.layers[j].write_kv(h[k:], cache[j], gone, pos)
        h, rows = h[:k], rows[:k]
        if k == 0:
            break
    return next_tokens, exit_layer, exit_state


@torch.no_grad()
def generate_early_exit(model, head, prompt, new_tokens):
    """Greedy decoding with per-row early exits. The prompt runs at full depth (one pass fills every layer's
    cache); each new token then goes through :func:`decode_step`.

    Returns (tokens [B, new_tokens], exit layers [B, new_tokens - 1], exit states [B, new_tokens - 1, dim]).
    The first new token comes from the prompt's full-depth pass, so it has no exit layer.
    """
    batch, length = prompt.shape
    shape = (batch, MAX_LEN, HEADS, DIM // HEADS)
    cache = [(torch.zeros(shape), torch.zeros(shape)) for _ in model.layers]  # (keys, values) per layer
    rows = torch.arange(batch)
    h = model.embed_at(prompt, 0)
    for i, layer in enumerate(model.layers):
        h = layer(h, cache[i], rows, 0)
    tokens = [head(h[:, -1]).token]
    layers, states = [], []
    for step in range(new_tokens - 1):
        token, layer, state = decode_step(model, head, cache, tokens[-1], length + step)
        tokens.append(token)
        layers.append(layer)
        states.append(state)
    return torch.stack(tokens, 1), torch.stack(layers, 1), torch.stack(states, 1)


# ----------------------------------------------------------------------------------------------------------
# Main: train, decode, print, check
# ----------------------------------------------------------------------------------------------------------


def make_head(model, threshold):
    """The model's exit head: its final norm and tied embedding, by reference (no copy)."""
    return ExitHead(model.embed.weight, norm_weight=model.norm.weight, norm_eps=model.norm.eps, threshold=threshold)


def cells(values):
    """Values in columns three characters wide."""
    return "".join(f"{v:>3}" for v in values)


def summary(layers, tokens, full):
    """Layer runs used and skipped, and agreement with full-depth decoding, as one line."""
    run = layers.numel() * LAYERS
    used = int((layers + 1).sum())
    agree = (tokens == full).float().mean().item()
    return (
        f"{used:>3}/{run} layer runs, {1 - used / run:>4.0%} skipped (mean exit layer "
        f"{(layers + 1).float().mean():.2f} of {LAYERS}); tokens equal to full depth: {agree:.0%}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threshold", type=float, default=0.99, help="max_prob a row needs to exit (default 0.99)")
    parser.add_argument("--train-steps", type=int, default=200, help="training steps on the toy task (default 200)")
    parser.add_argument("--rows", type=int, default=8, help="batch rows to decode (default 8)")
    parser.add_argument("--quiet", action="store_true", help="print the summary and the checks only")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # tensors this small run fastest on one thread
    torch.manual_seed(0)
    model = TinyDecoder()
    t0 = time.perf_counter()
    losses = train(model, args.train_steps, torch.Generator().manual_seed(0))
    model.eval()
    loss_text = " ".join(f"{x:.2f}" for x in losses.tolist())
    print(f"trained {args.train_steps} steps in {time.perf_counter() - t0:.1f} s; loss after each layer: {loss_text}")

    # The exit head references the model's own tensors (the tied embedding is the lm_head): no copy.
    head = make_head(model, args.threshold)
    assert head.weight is model.embed.weight
    print(head)

    prompt = toy_batch(args.rows, PROMPT_LEN, torch.Generator().manual_seed(1))
    full = generate_full_depth(model, prompt, NEW_TOKENS)
    tokens, layers, states = generate_early_exit(model, head, prompt, NEW_TOKENS)

    if not args.quiet:
        print("\nexit layer of each token, 1-based (p: the first token, from the prompt's full-depth pass)")
        for r in range(args.rows):
            kind = "count" if r % 2 == 0 else "repeat"
            print(f"row {r} {kind:<6}  prompt {cells(prompt[r].tolist())}")
            print(f"{'':>14}output {cells(tokens[r].tolist())}")
            print(f"{'':>14}layer  {cells(['p'] + [x + 1 for x in layers[r].tolist()])}")
    print()
    for thr in sorted({0.5, 0.9, 0.99, 0.999, args.threshold}):
        if thr == args.threshold:
            print(f"threshold {thr:<5}: {summary(layers, tokens, full)}  <- above")
        else:
            other_tokens, other_layers, _ = generate_early_exit(model, make_head(model, thr), prompt, NEW_TOKENS)
            print(f"threshold {thr:<5}: {summary(other_layers, other_tokens, full)}")
    print("(a skipped layer still costs its exited rows one norm + k/v projection: state propagation)\n")

    # Check 1: a threshold no row reaches (max_prob <= 1 < 1.5): early-exit decoding is full-depth decoding.
    never, never_layers, _ = generate_early_exit(model, make_head(model, 1.5), prompt, NEW_TOKENS)
    # Check 2: each row's token is the plain head's argmax at its exit state; rows that left early passed.
    with torch.no_grad():
        logits = model.logits(states)
    early = layers < LAYERS - 1
    checks = {
        "an unreachable threshold gives full-depth decoding": torch.equal(never, full)
        and bool((never_layers == LAYERS - 1).all()),
        "each token is the plain head's argmax at its row's exit layer": torch.equal(logits.argmax(-1), tokens[:, 1:]),
        "each early exit passed the threshold": bool(
            (logits.softmax(-1).amax(-1)[early] >= args.threshold - 1e-5).all()
        ),
    }
    for name, ok in checks.items():
        print(f"check: {name}: {'ok' if ok else 'FAILED'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
