"""Exact mode's speed at a chosen draft acceptance: speedup(alpha, E) against model.generate (SmolLM2, CPU).

With the shared head of a model not trained for early exit, drafts are rarely accepted, so exact mode
cannot show what its mechanics are worth. Here the drafts are forced (see ``forced_drafts.py``): every
draft step runs for real at depth E (E layers and the exit check, so its cost is paid) and its token
is then replaced by the full model's greedy token with probability alpha, else by a wrong one. The
verification is exact, so the output still equals ``model.generate`` (reported as ``identical``).
speedup(alpha, E) = time(model.generate) / time(exact mode) is the ceiling a model trained for early
exit (LayerSkip checkpoints) reaches when its draft at depth E agrees with full depth a fraction alpha
of the time.

Systems per batch size, depth E and alpha, all with ``EarlyExitLM(model, [E])``:
  n=K     ``DraftPolicy(E, 0.0, K)``: always K drafts per round (K in --n); the table shows the best K
  auto    ``eem.draft = "auto"`` (depths [E], up to max(--n) drafts): it has to learn the acceptance
          within each call, from a pessimistic prior
  auto-mem  the same with ``eem.draft_memory = True`` (one EarlyExitLM per depth and alpha): it keeps
          what it learned across calls of a batch size, the warm-up and the earlier prompts included
With ``--draft-vocab SHARE`` every system drafts over that share of the vocabulary (its most frequent
tokens in the built-in corpus, ``eem.draft_vocab``): the draft step's exit check reads that share of
the head, and the forcing still sets the tokens.
plus ``generate`` (model.generate, the reference) and ``generate-1`` (model.generate of one token: the
prefill, for the cost model). Prompts: bench_speculative's six chat prompts, batches of consecutive
prompts cycled to fill them. All systems of a batch size run in interleaved rounds after a warm-up;
per system the medians are summed over the batches.

Columns: ``acceptance`` is exact mode's own acceptance_rate (kept drafts / verified drafts, a row
keeps a block up to its first wrong draft), ``expected`` what independent drafts right with
probability alpha give for the same block lengths (alpha + ... + alpha^n over n per block),
``draft_hit`` the share of forced drafts that were right (about alpha; the coins are seeded per batch
of prompts, the same for every system, so few drafts make it differ from alpha). ``model``: the
speedup predicted from measured costs, T1 + sum_k rounds(k) x round_s(k) against model.generate's
time, with T1 the prefill (generate-1), round_s(k) the median measured draft + verify time of a
round of k drafts at this batch size and depth (pooled over alpha and the fixed policies; k = 0 is
model.generate's per-token step) and rounds(k) the mean number of such rounds in a simulation of
exact mode's loop with independent drafts right with probability alpha (each row keeps its own
accepted prefix). The cost table gives model.generate's per-token step (plain_ms), the draft step
(draft_ms), the prefill and the median verification (with acceptance) per block length k.

The defaults run 74 systems per batch of prompts: about 90 minutes on 2 quiet cores (3/4 of it with
--repeats 2). A co-running job distorts 2-thread CPU timings badly (see
benchmarks/results/cpu_costs.md), so run it alone.

Usage: OMP_NUM_THREADS=2 python benchmarks/bench_controlled_acceptance.py [--batches 1,4]
    [--alphas 0.5,0.6,0.7,0.8,0.9,1.0] [--depths L/4,L/2] [--n 2,3,4,6] [--new-tokens 48] [--repeats 3]
    [--draft-vocab 0.25] [--quick]   (--quick: batch 1, alpha 0.8, depth L/4, 16 new tokens, one round)
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_speculative import PROMPTS, batches_of, encode_chats, new_tokens_of, special_tokens  # noqa: E402
from bench_utils import add_generation_args, environment, format_table, timed_rounds, write_csv  # noqa: E402
from forced_drafts import ForcedStats, expected_acceptance, expected_rounds, forced_drafts  # noqa: E402

#: The target of issue 12 at alpha = 0.8, E = L/4: exact mode's speedup over model.generate by batch size.
TARGETS = {1: 1.5, 4: 1.3}


def parse_depths(text, num_layers):
    """'L/4,L/2,12' -> [8, 15, 12] for L = 30 (L/k rounds half up)."""
    depths = []
    for part in text.split(","):
        part = part.strip()
        if part.upper().startswith("L/"):
            depths.append(int(num_layers / float(part[2:]) + 0.5))
        else:
            depths.append(int(part))
    for e in depths:
        if not 1 <= e < num_layers:
            raise SystemExit(f"--depths: {e} is not in [1, {num_layers})")
    return depths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--alphas", default="0.5,0.6,0.7,0.8,0.9,1.0")
    p.add_argument("--depths", default="L/4,L/2", help="draft depths: ints or L/k")
    p.add_argument("--n", default="2,3,4,6", help="drafts per round of the fixed policies")
    p.add_argument("--no-auto", action="store_true", help="skip the adaptive policy (auto and auto-mem)")
    p.add_argument(
        "--draft-vocab",
        type=float,
        default=None,
        metavar="SHARE",
        help="draft over the SHARE most frequent tokens of the built-in corpus (FR-Spec; eem.draft_vocab)",
    )
    add_generation_args(p)
    p.add_argument("--seed", type=int, default=0, help="of the forcing's coins (+ the batch's index)")
    p.add_argument("--quick", action="store_true", help="batch 1, alpha 0.8, depth L/4, 16 new tokens, one round")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.alphas, args.depths = "1", "0.8", args.depths.split(",")[0]
        args.new_tokens, args.repeats = 16, 1

    import earlyexit
    from earlyexit.apps.smollm2 import load_smollm2
    from earlyexit.hf import DraftPolicy

    torch.manual_seed(0)
    model, tok = load_smollm2()
    device = model.device
    env = environment(device)
    eos, pad = special_tokens(model)
    vocab = model.config.vocab_size
    n_new = args.new_tokens
    num_layers = model.config.num_hidden_layers
    depths = parse_depths(args.depths, num_layers)
    alphas = [float(a) for a in args.alphas.split(",")]
    ns = [int(k) for k in args.n.split(",")]
    policies = {f"n={k}": k for k in ns}
    if not args.no_auto:
        policies.update({name: name for name in ADAPTIVE})
    draft_vocab = None
    if args.draft_vocab is not None:
        from earlyexit.tuning.draft_vocab import draft_vocabulary
        from earlyexit.tuning.text_data import builtin_corpus

        draft_vocab = draft_vocabulary(builtin_corpus("train"), vocab, share=args.draft_vocab, tokenizer=tok)

    def make_eem(e, memory=False):
        eem = earlyexit.EarlyExitLM(model, [e])
        eem.draft_tokens = max(ns)
        eem.draft_vocab = draft_vocab
        eem.draft_memory = memory
        return eem

    eems = {e: make_eem(e) for e in depths}
    # What a remembering policy learns depends on the forcing's alpha: one EarlyExitLM for each.
    eems_mem = {(e, a): make_eem(e, memory=True) for e in depths for a in alphas} if not args.no_auto else {}
    sub = "" if draft_vocab is None else f", drafts over {draft_vocab.numel()} of {vocab} tokens"
    print(
        f"# L={num_layers}, depths {depths}, alphas {alphas}, policies {list(policies)}, {n_new} new tokens, "
        f"repeats {args.repeats}, {env['device']}{sub}",
        flush=True,
    )

    rows, costs, summary = [], [], []
    t_start = time.perf_counter()
    for size in [int(b) for b in args.batches.split(",")]:
        groups = batches_of(PROMPTS, size)
        per_system = {}  # label -> dict(secs, same, rows, stats, forced)
        for gi, prompts in enumerate(groups):
            ids, am = encode_chats(tok, prompts, device)
            with torch.inference_mode():
                reference = model.generate(ids, attention_mask=am, max_new_tokens=n_new, do_sample=False)
            reference = reference[:, ids.shape[1] :]
            runners = {
                "generate": lambda ids=ids, am=am: model.generate(
                    ids, attention_mask=am, max_new_tokens=n_new, do_sample=False
                ),
                "generate-1": lambda ids=ids, am=am: model.generate(
                    ids, attention_mask=am, max_new_tokens=1, do_sample=False
                ),
            }
            for e in depths:
                for alpha in alphas:
                    for name, k in policies.items():
                        label = (e, alpha, name)
                        entry = per_system.setdefault(
                            label, dict(secs=[], same=0, rows=0, stats=[], forced=ForcedStats())
                        )
                        draft = DraftPolicy(e, 0.0, k) if isinstance(k, int) else "auto"

                        def run(
                            eem=eems_mem[(e, alpha)] if k == "auto-mem" else eems[e],
                            draft=draft,
                            alpha=alpha,
                            forced=entry["forced"],
                            ref=reference,
                            ids=ids,
                            am=am,
                            gi=gi,
                        ):
                            eem.draft = draft
                            # Coins: the same for every system and round of a batch, new for each batch.
                            with forced_drafts(ref, am, alpha, vocab, seed=args.seed + gi, stats=forced):
                                out = eem.generate(ids, am, max_new_tokens=n_new, mode="exact")
                            return out.sequences, out.stats  # not the cache: 60 of them add up

                        runners[label] = run
            timed = timed_rounds(runners, device, args.repeats)
            ref_tokens = new_tokens_of(timed["generate"][0], ids.shape[1], pad, eos)
            for label, (out, secs) in timed.items():
                seqs, stats = (out, None) if isinstance(out, torch.Tensor) else out
                entry = per_system.setdefault(label, dict(secs=[], same=0, rows=0, stats=[]))
                entry["secs"].append(secs)
                if label == "generate-1":
                    continue
                got = new_tokens_of(seqs, ids.shape[1], pad, eos)
                entry["same"] += sum(a == b for a, b in zip(got, ref_tokens))
                entry["rows"] += len(ref_tokens)
                if stats is not None:
                    entry["stats"].append(stats)
            print(
                f"# batch {size}: group {gi + 1}/{len(groups)} done, {time.perf_counter() - t_start:.0f} s so far",
                flush=True,
            )
        new_rows, new_costs = _rows(per_system, size, len(groups), depths, alphas, policies, n_new, env)
        rows += new_rows
        costs += new_costs
        summary += _summary(new_rows, size, depths, alphas)
        print(format_table(new_costs, COST_COLUMNS), flush=True)
        print(format_table([r for r in summary if r["batch"] == size], SUMMARY_COLUMNS), flush=True)

    print()
    print(format_table(rows, COLUMNS))
    print()
    print(format_table(costs, COST_COLUMNS))
    print()
    print(format_table(summary, SUMMARY_COLUMNS))
    for line in _targets(summary, depths[0], num_layers):
        print(line)
    stem = f"controlled_acceptance_{env['device']}_torch{env['torch']}".replace("+", "_")
    if draft_vocab is not None:
        stem += f"_vocab{args.draft_vocab:g}"
    write_csv(os.path.join(args.out, stem + ".csv"), rows)
    write_csv(os.path.join(args.out, stem + "_costs.csv"), costs)
    print(f"wrote {os.path.join(args.out, stem)}.csv and {stem}_costs.csv ({time.perf_counter() - t_start:.0f} s)")


COLUMNS = [
    "batch",
    "depth",
    "alpha",
    "policy",
    "speedup",
    "model",
    "acceptance",
    "expected",
    "draft_hit",
    "identical",
    "blocks",
]
#: The adaptive systems: no fixed block length, no cost-model prediction.
ADAPTIVE = ("auto", "auto-mem")
COST_COLUMNS = ["batch", "depth", "plain_ms", "draft_ms", "draft_vs_plain", "prefill_ms", "verify_ms"]
SUMMARY_COLUMNS = [
    "batch",
    "depth",
    "alpha",
    "best",
    "speedup",
    "model",
    "acceptance",
    "expected",
    "draft_hit",
    "auto",
    "auto_acc",
    "auto_blocks",
    "auto_mem",
    "auto_mem_blocks",
    "identical",
]


def _median(xs):
    return statistics.median(xs) if xs else None


def _cost(round_cost, drafts, plain_s):
    """Seconds of a round of ``drafts`` drafts: measured, else the nearest measured block length; 0: a plain step."""
    if drafts == 0:
        return plain_s
    return round_cost[min(round_cost, key=lambda d: (abs(d - drafts), d))]


def _rows(per_system, size, n_groups, depths, alphas, policies, n_new, env):
    """Result rows (one per depth, alpha, policy) and cost rows (one per depth) of one batch size."""
    t_gen = sum(per_system["generate"]["secs"])
    t_one = sum(per_system["generate-1"]["secs"])
    plain_s = (t_gen - t_one) / (n_groups * max(n_new - 1, 1))  # model.generate's per-token step
    rows, costs = [], []
    for e in depths:
        # Round costs by drafts verified, pooled over alpha (the forcing changes tokens, not work).
        round_s, draft_s = {}, []
        for (d, _, name), entry in ((k, v) for k, v in per_system.items() if isinstance(k, tuple)):
            if d != e or name in ADAPTIVE:
                continue
            for drafted, _, ds, vs in entry["forced"].rounds:
                round_s.setdefault(drafted, []).append((ds, vs))
                if drafted:
                    draft_s.append(ds / drafted)
        t_draft = _median(draft_s)
        round_cost = {d: _median([ds + vs for ds, vs in v]) for d, v in round_s.items() if d}
        costs.append(
            dict(
                batch=size,
                depth=e,
                plain_ms=plain_s * 1e3,
                draft_ms=t_draft * 1e3 if t_draft else None,
                draft_vs_plain=t_draft / plain_s if t_draft and plain_s > 0 else None,
                prefill_ms=t_one / n_groups * 1e3,
                verify_ms=" ".join(f"{k}:{_median([v for _, v in round_s[k]]) * 1e3:.1f}" for k in sorted(round_s)),
                **env,
            )
        )
        for alpha in alphas:
            for name, k in policies.items():
                entry = per_system[(e, alpha, name)]
                stats, forced = entry["stats"], entry["forced"]
                blocks = {}
                for s in stats:
                    for b, c in s["block_lengths"].items():
                        blocks[b] = blocks.get(b, 0) + c
                model = None
                if isinstance(k, int) and round_cost:
                    sim = expected_rounds(alpha, k, n_new, rows=size, seed=0)
                    predicted = t_one + n_groups * sum(c * _cost(round_cost, d, plain_s) for d, c in sim.items())
                    model = t_gen / predicted
                rows.append(
                    dict(
                        batch=size,
                        depth=e,
                        alpha=alpha,
                        policy=name,
                        speedup=t_gen / sum(entry["secs"]),
                        model=model,
                        acceptance=statistics.mean(s["acceptance_rate"] for s in stats),
                        expected=expected_acceptance(alpha, blocks),
                        draft_hit=forced.hit_rate,
                        identical=f"{entry['same']}/{entry['rows']}",
                        same=entry["same"],
                        rows=entry["rows"],
                        blocks=" ".join(f"{b}:{c}" for b, c in sorted(blocks.items())),
                        plain_steps=sum(s["plain_steps"] for s in stats),
                        seconds=sum(entry["secs"]),
                        generate_seconds=t_gen,
                        new_tokens=n_new,
                        **env,
                    )
                )
    return rows, costs


def _summary(rows, size, depths, alphas):
    """One row per depth and alpha: the best fixed block length against the adaptive policy."""
    out = []
    for e in depths:
        for alpha in alphas:
            group = [r for r in rows if r["depth"] == e and r["alpha"] == alpha]
            fixed = [r for r in group if r["policy"] not in ADAPTIVE]
            auto = next((r for r in group if r["policy"] == "auto"), None)
            auto_mem = next((r for r in group if r["policy"] == "auto-mem"), None)
            best = max(fixed, key=lambda r: r["speedup"]) if fixed else None
            same, total = sum(r["same"] for r in group), sum(r["rows"] for r in group)
            entry = dict(batch=size, depth=e, alpha=alpha, identical=f"{same}/{total}")
            if best:
                entry.update(
                    best=best["policy"],
                    speedup=best["speedup"],
                    model=best["model"],
                    acceptance=best["acceptance"],
                    expected=best["expected"],
                    draft_hit=best["draft_hit"],
                )
            if auto:
                entry.update(auto=auto["speedup"], auto_acc=auto["acceptance"], auto_blocks=auto["blocks"])
            if auto_mem:
                entry.update(auto_mem=auto_mem["speedup"], auto_mem_blocks=auto_mem["blocks"])
            out.append(entry)
    return out


def _targets(summary, depth, num_layers):
    """Lines comparing alpha = 0.8 at the first depth with the targets of issue 12."""
    lines = []
    for size, target in TARGETS.items():
        r = next((r for r in summary if r["batch"] == size and r["depth"] == depth and r["alpha"] == 0.8), None)
        if r is None or r.get("speedup") is None:
            continue
        verdict = "met" if r["speedup"] >= target else "NOT met"
        model = "-" if r.get("model") is None else f"{r['model']:.2f}x"
        auto = "-" if r.get("auto") is None else f"{r['auto']:.2f}x"
        auto_mem = "-" if r.get("auto_mem") is None else f"{r['auto_mem']:.2f}x"
        lines.append(
            f"target alpha=0.8, E={depth} (L={num_layers}), batch {size}: best fixed {r['best']} "
            f"{r['speedup']:.2f}x (model {model}), auto {auto}, auto-mem {auto_mem}; target {target}x: {verdict}"
        )
    return lines


if __name__ == "__main__":
    main()
