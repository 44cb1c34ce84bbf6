"""Early exit against transformers' own accelerations, side by side in one run (SmolLM2, CPU by default).

Systems, each on the same six chat prompts (summary, translation, code, QA, arithmetic, advice), greedy:
  generate          model.generate (the reference: speed 1.00x, output = greedy by definition)
  hf-early-exit-E   transformers' self-speculation, ``assistant_early_exit=E`` (E in {8, 16}); batch 1 only,
                    the only batch size transformers' assisted generation accepts
  hf-prompt-lookup  ``prompt_lookup_num_tokens=10`` (batch 1 only, as above)
  ee-exact          earlyexit exact mode with its defaults (EarlyExitLM's default exit layers and draft policy)
  ee-exit           earlyexit exit mode after cost-aware calibration of the shared head on the built-in corpus
                    (target agreement --target), the calibrated layers and thresholds
at batch 1, 4 and 8 (batches are consecutive prompts, cycled to fill the batch). All systems run in
interleaved rounds; the median wall time per batch is reported as a speed ratio to ``model.generate`` on
the same batch, with the share of rows whose output equals ``model.generate``'s token for token, the
acceptance (exact mode), the mean decoder layers per token and the policy earlyexit chose (exact mode:
also the cache holes its rows' own accepted prefixes left at batch > 1, and how often they were compacted).

Usage: python benchmarks/bench_speculative.py [--batches 1,4,8] [--new-tokens 48] [--repeats 3] [--quick]
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import add_generation_args, environment, format_table, timed_rounds, write_csv  # noqa: E402

PROMPTS = [
    "Summarize in one sentence: The city council met on Tuesday to discuss the new park. After two hours of "
    "debate, members voted to fund a playground and a community garden, and to plant two hundred trees.",
    "Translate into French: The weather is beautiful today and we are going to the beach.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the capital of Japan, and what is it famous for?",
    "What is 17 plus 25? Explain the steps.",
    "Give me three tips for staying focused while studying.",
]


def batches_of(prompts, size):
    """Consecutive prompts, cycled so that every batch is full: the same prompts at every batch size."""
    count = -(-len(prompts) // size)
    return [[prompts[(i * size + j) % len(prompts)] for j in range(size)] for i in range(count)]


def encode_chats(tokenizer, prompts, device):
    """One user turn per prompt through the chat template, left-padded: (input_ids, attention_mask) [B, T]."""
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in prompts
    ]
    enc = tokenizer(chats, return_tensors="pt", padding=True).to(device)
    return enc.input_ids, enc.attention_mask


def special_tokens(model):
    """(set of end-of-sequence ids, pad id) from the model's generation config."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]), model.generation_config.pad_token_id


def new_tokens_of(sequences, prompt_len, pad, eos):
    """Per row, the generated ids up to and including the first end of sequence (padding dropped)."""
    rows = []
    for row in sequences[:, prompt_len:].tolist():
        out = []
        for t in row:
            if t == pad and not out:
                continue
            out.append(t)
            if t in eos:
                break
        rows.append(out)
    return rows


def make_runners(model, exact, calibrated, ids, am, n, hf_systems):
    """{system: call} on one batch; transformers' assisted systems only where they run (batch 1)."""
    greedy = dict(attention_mask=am, max_new_tokens=n, do_sample=False)
    runners = {"generate": lambda: model.generate(ids, **greedy)}
    if hf_systems:
        for e in (8, 16):
            runners[f"hf-early-exit-{e}"] = lambda e=e: model.generate(ids, assistant_early_exit=e, **greedy)
        runners["hf-prompt-lookup"] = lambda: model.generate(ids, prompt_lookup_num_tokens=10, **greedy)
    runners["ee-exact"] = lambda: exact.generate(ids, am, max_new_tokens=n, mode="exact")
    runners["ee-exit"] = lambda: calibrated.generate(ids, am, max_new_tokens=n, mode="exit")
    return runners


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,8")
    add_generation_args(p)
    p.add_argument("--target", type=float, default=0.95, help="calibration target agreement of ee-exit")
    p.add_argument("--quick", action="store_true", help="batch 1 only, 16 new tokens, one round")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.new_tokens, args.repeats = "1", 16, 1

    import earlyexit
    from earlyexit.apps.smollm2 import load_smollm2
    from earlyexit.tuning.text_data import builtin_corpus

    torch.manual_seed(0)
    model, tok = load_smollm2()
    device = model.device
    env = environment(device)
    eos, pad = special_tokens(model)
    n = args.new_tokens

    exact = earlyexit.EarlyExitLM(model, [12, 18, 24])
    calibrated = earlyexit.EarlyExitLM(model, [12, 18, 24])
    _, report = earlyexit.calibrate(
        calibrated, builtin_corpus("train"), target_agreement=args.target, tokenizer=tok, progress=False
    )
    print(f"# ee-exit calibration: {report}", flush=True)

    rows = []
    for size in [int(b) for b in args.batches.split(",")]:
        per_system = {}
        for prompts in batches_of(PROMPTS, size):
            ids, am = encode_chats(tok, prompts, device)
            runners = make_runners(model, exact, calibrated, ids, am, n, hf_systems=size == 1)
            timed = timed_rounds(runners, device, args.repeats)
            ref = new_tokens_of(timed["generate"][0], ids.shape[1], pad, eos)
            for label, (out, secs) in timed.items():
                seqs = out if isinstance(out, torch.Tensor) else out.sequences
                got = new_tokens_of(seqs, ids.shape[1], pad, eos)
                entry = per_system.setdefault(label, dict(secs=[], same=0, rows=0, stats=[]))
                entry["secs"].append(secs)
                entry["same"] += sum(a == b for a, b in zip(got, ref))
                entry["rows"] += len(ref)
                if not isinstance(out, torch.Tensor):
                    entry["stats"].append(out.stats)
        base = sum(per_system["generate"]["secs"])
        for label, entry in per_system.items():
            stats = entry["stats"]
            rows.append(
                dict(
                    system=label,
                    batch=size,
                    speed_vs_generate=base / sum(entry["secs"]),
                    identical=f"{entry['same']}/{entry['rows']}",
                    acceptance=statistics.mean(s["acceptance_rate"] for s in stats)
                    if stats and "acceptance_rate" in stats[0]
                    else None,
                    mean_layers=statistics.mean(s["mean_layers_per_token"] for s in stats) if stats else None,
                    policy=_policy(label, stats, calibrated),
                    seconds=sum(entry["secs"]),
                    **env,
                )
            )
        print(format_table([r for r in rows if r["batch"] == size], COLUMNS), flush=True)
    print(format_table(rows, COLUMNS))
    stem = f"speculative_{env['device']}_torch{env['torch']}".replace("+", "_")
    write_csv(os.path.join(args.out, stem + ".csv"), rows)
    print(f"wrote {os.path.join(args.out, stem)}.csv")


COLUMNS = ["system", "batch", "speed_vs_generate", "identical", "acceptance", "mean_layers", "policy"]


def _policy(label, stats, calibrated):
    """What earlyexit chose, in a few words: the calibrated exits, or exact mode's draft depth and blocks."""
    if label == "ee-exit":
        return f"exits {list(calibrated.exit_layers)} thr {[round(float(t), 3) for t in calibrated.thresholds]}"
    if label == "ee-exact" and stats:
        keys = ("draft_depth", "block_lengths", "cache_holes", "cache_compactions")
        return ", ".join(f"{k}={stats[-1][k]}" for k in keys if k in stats[-1]) or None
    return None


if __name__ == "__main__":
    main()
