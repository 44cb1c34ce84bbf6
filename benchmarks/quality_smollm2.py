"""Quality/speed trade-off of early exits on SmolLM2-135M, shared head vs trained adapters.

Teacher-forced agreement with the full-depth token against mean layers per token, on a held-out
split of Python's pydoc topics (never seen by adapter training or calibration). For each head
(shared final norm + lm_head, or trained adapters) and each measure (max_prob, margin, entropy),
thresholds are calibrated on the calibration split for a range of target agreements and evaluated
on the held-out split. Writes benchmarks/results/quality_smollm2.md and a PNG plot.

Usage: python benchmarks/quality_smollm2.py [--adapters DIR] [--steps N] [--tokens N]
"""

import argparse
import os
import sys
import time

import torch

from earlyexit import EarlyExitLM, ExitAdapters, train_exit_adapters
from earlyexit.apps.smollm2 import load_smollm2
from earlyexit.tuning.calibrate import choose_thresholds, exit_scores_by_measure, report_for
from earlyexit.tuning.teacher_forcing import collect_states
from earlyexit.tuning.text_data import builtin_corpus, token_windows

EXIT_LAYERS = [8, 12, 16, 20, 24]
TARGETS = [0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995]
MEASURES = ["max_prob", "margin", "entropy"]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def split_states(model, tokenizer, texts, tokens, seq_len=128):
    windows = token_windows(texts, seq_len, tokenizer=tokenizer, max_tokens=tokens)
    return collect_states(model, EXIT_LAYERS, windows)


def curves(model, heads_by_name, calib, held):
    """Rows of (head, measure, target, calibration/held-out agreement and mean layers)."""
    rows = []
    for head_name, heads in heads_by_name.items():
        eem = EarlyExitLM(model, EXIT_LAYERS, heads=heads)
        cal_by_measure = exit_scores_by_measure(eem, *calib, MEASURES)
        held_by_measure = exit_scores_by_measure(eem, *held, MEASURES)
        for measure in MEASURES:
            cal_scores, held_scores = cal_by_measure[measure], held_by_measure[measure]
            per_layer = held_scores.correct.float().mean(1).tolist()
            for target in TARGETS:
                thr = choose_thresholds(cal_scores, target)
                cal = report_for(cal_scores, thr, target)
                test = report_for(held_scores, thr, target)
                rows.append(
                    dict(
                        head=head_name,
                        measure=measure,
                        target=target,
                        calib_agreement=cal.agreement,
                        agreement=test.agreement,
                        mean_layers=test.mean_layers,
                        layer_fraction=test.layer_fraction,
                        thresholds=[round(t, 4) for t in test.thresholds],
                        per_layer_agreement=per_layer,
                    )
                )
                print(f"{head_name:8s} {measure:8s} target {target:.3f}: held-out {test}")
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for head in sorted({r["head"] for r in rows}):
        for measure in MEASURES:
            pts = sorted(
                (r["mean_layers"], r["agreement"]) for r in rows if r["head"] == head and r["measure"] == measure
            )
            style = "-" if head == "adapters" else "--"
            ax.plot(*zip(*pts), style, marker="o", label=f"{head}, {measure}")
    ax.axhline(0.99, color="grey", lw=0.8)
    ax.axvline(0.75 * 30, color="grey", lw=0.8)
    ax.set_xlabel("mean decoder layers per token (of 30)")
    ax.set_ylabel("agreement with full depth (held-out, teacher-forced)")
    ax.set_title("SmolLM2-135M early exits: goal = 99% agreement at <= 22.5 layers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(rows, path, meta):
    best = {}
    for r in rows:
        if r["agreement"] >= 0.99:
            key = (r["head"], r["measure"])
            if key not in best or r["mean_layers"] < best[key]["mean_layers"]:
                best[key] = r
    lines = [
        "# Early-exit quality on SmolLM2-135M-Instruct",
        "",
        f"Measured {meta['date']} on {meta['machine']}, torch {torch.__version__}; command: "
        "`python benchmarks/quality_smollm2.py`.",
        "",
        f"Exit layers {EXIT_LAYERS} of 30. Text: Python's pydoc topics, split by topic into adapter training "
        f"({meta['train_tokens']} tokens), calibration ({meta['calib_tokens']} tokens) and held-out "
        f"({meta['held_tokens']} tokens) parts. Teacher-forced: each position's early-exit token is compared "
        "with the full model's token at that position. Adapters: "
        f"{meta['adapters']}.",
        "",
        "Per-layer agreement of the exit token with full depth (held-out, no threshold):",
        "",
        "| head | " + " | ".join(f"layer {k}" for k in EXIT_LAYERS) + " |",
        "| --- | " + " | ".join("---" for _ in EXIT_LAYERS) + " |",
    ]
    for head in sorted({r["head"] for r in rows}):
        per = next(r["per_layer_agreement"] for r in rows if r["head"] == head)
        lines.append(f"| {head} | " + " | ".join(f"{a:.1%}" for a in per) + " |")
    lines += [
        "",
        "Thresholds calibrated for each target on the calibration split, evaluated on the held-out split:",
        "",
        "| head | measure | target | calib. agreement | held-out agreement | mean layers | share of layers |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['head']} | {r['measure']} | {r['target']:.3f} | {r['calib_agreement']:.2%} | "
            f"{r['agreement']:.2%} | {r['mean_layers']:.2f} | {r['layer_fraction']:.1%} |"
        )
    lines += ["", "## Goal: at least 99% held-out agreement at no more than 75% of the layers (22.5)", ""]
    for head in ("shared", "adapters"):
        for measure in MEASURES:
            r = best.get((head, measure))
            if r is None:
                lines.append(f"- {head}, {measure}: no threshold reached 99% held-out agreement.")
            else:
                verdict = "met" if r["layer_fraction"] <= 0.75 else f"missed by {r['mean_layers'] - 22.5:.2f} layers"
                lines.append(
                    f"- {head}, {measure}: {r['agreement']:.2%} at {r['mean_layers']:.2f} layers "
                    f"({r['layer_fraction']:.1%}): {verdict}."
                )
    lines += ["", "![agreement vs layers](quality_smollm2.png)", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", default=None, help="load trained adapters from DIR instead of training")
    p.add_argument("--steps", type=int, default=None, help="adapter training steps (default: the library's)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens in each of the calibration and held-out splits")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    model, tokenizer = load_smollm2()
    train = builtin_corpus("train")
    # The training topics feed the adapters; the calibration split takes the other half of them.
    calib_texts, adapter_texts = train[1::2], train[0::2]
    t0 = time.time()
    if args.adapters:
        adapters = ExitAdapters.load(args.adapters, model=model)
        how = f"loaded from {args.adapters}"
    else:
        kw = {} if args.steps is None else {"steps": args.steps}
        adapters = train_exit_adapters(model, EXIT_LAYERS, adapter_texts, tokenizer=tokenizer, **kw)
        settings = "library defaults" + (f", steps={args.steps}" if args.steps else "")
        how = f"trained here in {time.time() - t0:.0f} s ({settings})"
    calib = split_states(model, tokenizer, calib_texts, args.tokens)
    held = split_states(model, tokenizer, builtin_corpus("held_out"), args.tokens)
    rows = curves(model, {"shared": None, "adapters": adapters}, calib, held)
    os.makedirs(args.out, exist_ok=True)
    meta = dict(
        date=time.strftime("%Y-%m-%d"),
        machine=f"{os.cpu_count()} CPU cores",
        train_tokens="up to 16384",
        calib_tokens=calib[1].shape[0],
        held_tokens=held[1].shape[0],
        adapters=how,
    )
    write_markdown(rows, os.path.join(args.out, "quality_smollm2.md"), meta)
    plot(rows, os.path.join(args.out, "quality_smollm2.png"))
    print(f"wrote {args.out}/quality_smollm2.md and .png")


if __name__ == "__main__":
    sys.exit(main())
