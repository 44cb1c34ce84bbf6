"""Measured cost model and cost-aware calibration of SmolLM2-135M's shared exit head.

Measures :func:`earlyexit.measure_costs` (model's device and dtype, batch sizes 1/4/8), then for each
target calibrates with ``objective="time"`` on the built-in corpus's "train" split and checks the
chosen policy, teacher-forced, on its "held_out" split; the mean-layers policy of ``objective="layers"``
at the same target is shown under the same cost model for comparison. Prints a markdown report.

Usage: python benchmarks/cpu_costs.py [--device cpu] [--targets 0.95,0.99] [--exit-layers 8,12,16,20,24]
       [--threads N]
"""

import argparse
import time

import torch

from earlyexit import EarlyExitLM, calibrate, measure_costs
from earlyexit.apps.smollm2 import load_smollm2
from earlyexit.tuning.calibrate import exit_scores, report_for, to_score_thresholds
from earlyexit.tuning.text_data import builtin_corpus
from earlyexit.tuning.time_objective import expected_time


def held_out(scores, eem_layers, thresholds, measure, costs):
    """(agreement, mean layers, expected s/token) of a policy on layers ``eem_layers`` on held-out scores."""
    kept = [scores.exit_layers.index(k) for k in eem_layers]
    thr = torch.full((len(scores.exit_layers),), torch.inf)
    if kept:
        thr[kept] = to_score_thresholds(thresholds, measure)
    rep = report_for(scores, thr)
    return rep.agreement, rep.mean_layers, expected_time(scores, thr, kept, costs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--targets", default="0.95,0.99")
    p.add_argument("--exit-layers", default="8,12,16,20,24")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = [int(x) for x in args.exit_layers.split(",")]
    model, tok = load_smollm2()
    model.to(args.device)
    train, held = builtin_corpus("train"), builtin_corpus("held_out")
    eem = EarlyExitLM(model, layers)
    t0 = time.perf_counter()
    costs = measure_costs(eem)
    print(f"measure_costs: {time.perf_counter() - t0:.1f} s, {torch.get_num_threads()} torch threads\n")
    print(f"```\n{costs}\n```\n")
    held_scores = exit_scores(eem, held, tokenizer=tok, progress=False)
    print(
        "| objective | target | kept layers | thresholds (max_prob) | calib. agreement | held-out agreement "
        "| held-out mean layers | expected ms/token (held-out) | full depth ms/token | time vs full | margin "
        "| calibrate s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for target in (float(x) for x in args.targets.split(",")):
        for objective in ("time", "layers"):
            e = EarlyExitLM(model, layers)
            t0 = time.perf_counter()
            thr, rep = calibrate(
                e, train, target_agreement=target, tokenizer=tok, objective=objective, costs=costs, progress=False
            )
            secs = time.perf_counter() - t0
            agree, mean_layers, t_held = held_out(held_scores, e.exit_layers, thr, e.measure, costs)
            full = expected_time(held_scores, torch.full((len(layers),), torch.inf), [], costs)
            kept = ", ".join(map(str, e.exit_layers)) or "none (early exit off)"
            print(
                f"| {objective} | {target} | {kept} | {', '.join(f'{t:.4f}' for t in thr) or '-'} | "
                f"{rep.agreement:.2%} | {agree:.2%} | {mean_layers:.2f} | {t_held * 1e3:.2f} | {full * 1e3:.2f} | "
                f"{t_held / full:.1%} | {rep.margin:.2%} | {secs:.0f} |"
            )


if __name__ == "__main__":
    main()
