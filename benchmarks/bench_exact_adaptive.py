"""Exact mode's draft policy against model.generate on SmolLM2 (CPU float32 by default), greedy.

Systems: ``generate`` (model.generate, the reference), ``exact`` (EarlyExitLM exact mode with its
default draft policy), ``plain`` (exact mode with ``DraftPolicy(None)``: no drafts) and
``fixed-E`` (``DraftPolicy(E, threshold, max_tokens)``). The demo's four chat prompts run one by
one (batch 1) or as one left-padded batch (batch 4); all systems run in interleaved rounds after a
warm-up, and the median wall time per round is reported as a speed ratio to ``model.generate``,
with whether every row's output equals it and the policy's statistics from the last round.

Usage: OMP_NUM_THREADS=2 python benchmarks/bench_exact_adaptive.py [--batches 1,4] [--new-tokens 32]
    [--repeats 5] [--systems generate,exact,plain] [--fixed 12:0.9:4]
"""

import argparse
import statistics
import time

import torch


def _systems(names, model, eem_factory, fixed):
    out = {}
    for name in names:
        if name == "generate":
            out[name] = lambda enc, n: model.generate(**enc, max_new_tokens=n, do_sample=False)
            continue
        eem = eem_factory()
        if name in ("plain", "fixed"):
            from earlyexit.hf import DraftPolicy  # not in the code before the draft policy (name "exact" is)
        if name == "plain":
            eem.draft = DraftPolicy(None)
        elif name == "fixed":
            depth, threshold, max_tokens = fixed.split(":")
            eem.draft = DraftPolicy(int(depth), float(threshold), int(max_tokens))
            name = f"fixed-{fixed}"
        out[name] = eem
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--systems", default="generate,exact,plain")
    ap.add_argument("--fixed", default="12:0.9:4", help="E:threshold:max_tokens of the 'fixed' system")
    args = ap.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))

    from earlyexit import EarlyExitLM
    from earlyexit.apps.demo import PROMPTS
    from earlyexit.apps.smollm2 import load_smollm2

    model, tok = load_smollm2()
    chats = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    systems = _systems(
        args.systems.split(","), model, lambda: EarlyExitLM(model, [12, 18, 24], threshold=0.9), args.fixed
    )
    n = args.new_tokens
    for batch in (int(b) for b in args.batches.split(",")):
        groups = [chats[i : i + batch] for i in range(0, len(chats), batch)]
        encs = [tok(g, return_tensors="pt", padding=True) for g in groups]

        def run(system, enc, n=n):
            with torch.inference_mode():
                if callable(system) and not hasattr(system, "generate"):
                    return system(enc, n), None
                out = system.generate(enc.input_ids, enc.attention_mask, max_new_tokens=n, mode="exact")
                return out.sequences, out.stats

        refs = [run(systems["generate"], e)[0] for e in encs]
        for s in systems.values():  # warm-up
            run(s, encs[0], 4)
        times = {name: [] for name in systems}
        last = {}
        for _ in range(args.repeats):
            for name, s in systems.items():
                t0 = time.perf_counter()
                outs = [run(s, e) for e in encs]
                times[name].append(time.perf_counter() - t0)
                same = all(torch.equal(o, r) for (o, _), r in zip(outs, refs))
                last[name] = (same, outs[-1][1])
        base = statistics.median(times["generate"])
        for name in systems:
            med = statistics.median(times[name])
            same, stats = last[name]
            policy = ""
            if stats and "draft_rounds" in stats:
                policy = (
                    f"plain {stats['plain_steps']} / draft rounds {stats['draft_rounds']}, depth "
                    f"{stats['draft_depth']}, threshold {stats['draft_threshold']}, blocks {stats['block_lengths']}, "
                    f"acceptance {stats['acceptance_rate']:.2f}"
                )
            elif stats:
                policy = f"acceptance {stats['acceptance_rate']:.2f}"
            print(
                f"| {batch} | {name} | {med * 1e3 / len(encs):.0f} | {base / med:.2f} | "
                f"{'yes' if same else 'NO'} | {policy} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
