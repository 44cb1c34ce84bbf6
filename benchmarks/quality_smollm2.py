"""Quality/speed trade-off of early exits on SmolLM2-135M: every exit signal, shared head vs trained adapters.

Teacher-forced agreement with the full-depth token against mean layers per token and against the
expected time per token, on a held-out split of Python's pydoc topics (never seen by adapter training
or calibration). Signals:

- softmax confidence (max_prob, margin, entropy) through the shared head (final norm + lm_head) or
  through trained adapters: the head runs at every exit point a token passes;
- hidden-state saturation (measure="state", CALM): cos(h_k, h_(k-1)), no head at the checks, the head
  once where the token exits (its token through the shared head or the adapter);
- a SkipDecode position schedule (calibrate_schedule's family): no checks at all, the head once per token.

Thresholds (and schedules) are calibrated on the calibration split for a range of target agreements and
evaluated on the held-out split. The time per token is the expected one under a :class:`CostModel`
measured in the same run on this machine (batch 1: the layers, each check, the exit token, state
propagation, the full-depth head), so it includes what each signal's checks cost. Writes
benchmarks/results/quality_smollm2.md and a PNG plot.

Usage: python benchmarks/quality_smollm2.py [--adapters DIR] [--steps N] [--tokens N]
"""

import argparse
import dataclasses
import os
import platform
import sys
import time

import torch

from earlyexit import EarlyExitLM, ExitAdapters, measure_costs, train_exit_adapters
from earlyexit.apps.smollm2 import load_smollm2
from earlyexit.tuning.calibrate import choose_thresholds, exit_scores_by_measure, report_for
from earlyexit.tuning.schedule_calibration import choose_schedule, layer_agreement, schedule_family
from earlyexit.tuning.teacher_forcing import collect_states
from earlyexit.tuning.text_data import builtin_corpus, token_windows
from earlyexit.tuning.time_objective import expected_time

EXIT_LAYERS = [8, 12, 16, 20, 24]
TARGETS = [0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995]
MEASURES = ["max_prob", "margin", "entropy", "state"]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def split_windows(tokenizer, texts, tokens, seq_len=128):
    return token_windows(texts, seq_len, tokenizer=tokenizer, max_tokens=tokens)


def signal_costs(model, heads_by_name):
    """({(head name, "head" or "state"): CostModel}, the shared CostModel) measured now at batch 1.

    What every signal pays alike (a decoder layer, the full-depth head, state propagation) comes from one
    measurement, the shared head's, so that timing noise between measurements cannot favour a signal;
    each signal's own exit checks (and the state measure's exit tokens) come from its own measurement.
    """
    out, base = {}, None
    for name, heads in heads_by_name.items():
        for kind, measure in (("head", "max_prob"), ("state", "state")):
            eem = EarlyExitLM(model, EXIT_LAYERS, heads=heads, measure=measure)
            cost = measure_costs(eem, batch_sizes=(1,), repeats=9)
            base = base or cost
            out[name, kind] = dataclasses.replace(cost, layer=base.layer, head=base.head, propagate=base.propagate)
    return out, base


def curves(model, heads_by_name, costs, calib, held):
    """Rows of (head, measure, target, calibration/held-out agreement, mean layers, expected ms per token)."""
    rows = []
    for head_name, heads in heads_by_name.items():
        eem = EarlyExitLM(model, EXIT_LAYERS, heads=heads)
        cal_by_measure = exit_scores_by_measure(eem, *calib, MEASURES)
        held_by_measure = exit_scores_by_measure(eem, *held, MEASURES)
        for measure in MEASURES:
            cal_scores, held_scores = cal_by_measure[measure], held_by_measure[measure]
            cost = costs[head_name, "state" if measure == "state" else "head"]
            per_layer = held_scores.correct.float().mean(1).tolist()
            for target in TARGETS:
                thr = choose_thresholds(cal_scores, target)
                cal = report_for(cal_scores, thr, target)
                test = report_for(held_scores, thr, target)
                seconds = expected_time(held_scores, thr, range(len(EXIT_LAYERS)), cost)
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
                        ms_per_token=seconds * 1e3,
                        full_ms=(cost.head_s(1) + model.config.num_hidden_layers * cost.layer_s(1)) * 1e3,
                    )
                )
                print(f"{head_name:8s} {measure:8s} target {target:.3f}: held-out {test}, {seconds * 1e3:.2f} ms/token")
    return rows


def schedule_rows(model, tokenizer, calib_texts, held_texts, tokens, cost):
    """Rows for SkipDecode schedules: the steepest of calibrate_schedule's family meeting each target on the
    calibration split, evaluated on the held-out split; expected time from the measured layer, head and
    propagation costs (a schedule has no checks)."""
    eem = EarlyExitLM(model, EXIT_LAYERS)
    L = eem.num_layers
    cal = layer_agreement(eem, calib_texts, tokenizer=tokenizer, max_tokens=tokens)
    held = layer_agreement(eem, held_texts, tokenizer=tokenizer, max_tokens=tokens)
    family = schedule_family(L, cal.positions)
    layer_s, prop_s, head_s = cost.layer_s(1), cost.propagate_s(1), cost.head_s(1)
    rows = []
    for target in TARGETS:
        schedule, report = choose_schedule(cal, family, target)
        depths = torch.tensor([schedule.layers(held.positions)], dtype=torch.int64)
        agreement, mean_layers = (float(x[0]) for x in held.score(depths))
        seconds = float((depths.double() * layer_s + (L - depths.double()) * prop_s).mean()) + head_s
        rows.append(
            dict(
                head="shared",
                measure="schedule",
                target=target,
                calib_agreement=report.agreement,
                agreement=agreement,
                mean_layers=mean_layers,
                layer_fraction=mean_layers / L,
                thresholds=repr(schedule),
                per_layer_agreement=None,
                ms_per_token=seconds * 1e3,
                full_ms=(head_s + L * layer_s) * 1e3,
            )
        )
        print(f"schedule target {target:.3f}: {schedule!r}, held-out {agreement:.2%} at {mean_layers:.2f} layers")
    return rows


def _series(rows):
    """{(head, measure): rows sorted by target}: one curve per signal."""
    out = {}
    for r in rows:
        out.setdefault((r["head"], r["measure"]), []).append(r)
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_layers, ax_time) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for (head, measure), pts in sorted(_series(rows).items()):
        style = "-" if head == "adapters" else "--"
        label = "schedule (SkipDecode)" if measure == "schedule" else f"{head}, {measure}"
        marker = "s" if measure in ("state", "schedule") else "o"
        agreement = [r["agreement"] for r in pts]
        ax_layers.plot([r["mean_layers"] for r in pts], agreement, style, marker=marker, label=label)
        ax_time.plot([r["ms_per_token"] for r in pts], agreement, style, marker=marker, label=label)
    full_ms = rows[0]["full_ms"]
    ax_layers.axvline(30, color="grey", lw=0.8)
    ax_time.axvline(full_ms, color="grey", lw=0.8)
    ax_layers.set_xlabel("mean decoder layers per token (of 30)")
    ax_time.set_xlabel(f"expected ms per token, batch 1 (measured costs; full depth {full_ms:.1f} ms: grey line)")
    ax_layers.set_ylabel("agreement with full depth (held-out, teacher-forced)")
    fig.suptitle("SmolLM2-135M early exits: agreement against layers and against time, every exit signal")
    for ax in (ax_layers, ax_time):
        ax.grid(alpha=0.3)
    ax_time.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _best_time_at(rows, agreement):
    """{(head, measure): the row of least expected time whose held-out agreement is >= ``agreement``}."""
    best = {}
    for key, pts in _series(rows).items():
        ok = [r for r in pts if r["agreement"] >= agreement]
        if ok:
            best[key] = min(ok, key=lambda r: r["ms_per_token"])
    return best


def write_markdown(rows, path, meta):
    best = {}
    for r in rows:
        if r["agreement"] >= 0.99:
            key = (r["head"], r["measure"])
            if key not in best or r["mean_layers"] < best[key]["mean_layers"]:
                best[key] = r
    full_ms = rows[0]["full_ms"]
    lines = [
        "# Early-exit quality on SmolLM2-135M-Instruct",
        "",
        f"Measured {meta['date']} on {meta['machine']}, torch {torch.__version__}; command: `{meta['command']}`.",
        "",
        f"Exit layers {EXIT_LAYERS} of 30. Text: Python's pydoc topics, split by topic into adapter training "
        f"({meta['train_tokens']} tokens), calibration ({meta['calib_tokens']} tokens) and held-out "
        f"({meta['held_tokens']} tokens) parts. Teacher-forced: each position's early-exit token is compared "
        "with the full model's token at that position. Adapters: "
        f"{meta['adapters']}.",
        "",
        "Signals: softmax confidence (max_prob, margin, entropy: the head at every exit point passed),",
        "hidden-state saturation (`state`: cos(h_k, h_(k-1)), no head at the checks, the head once where the",
        "token exits, through the shared head or the adapter), and a SkipDecode position schedule",
        "(`schedule`: the steepest member of `calibrate_schedule`'s family meeting the target, no checks; its",
        f"positions are those after a {meta['prompt_len']}-token prompt in each 128-token window).",
        "",
        "Time per token: expected seconds under a `CostModel` measured in this run at batch 1 (decoder layer,",
        "each exit check, the exit token of the state measure, state propagation, the full-depth head), not a",
        f"decode loop: full depth costs {full_ms:.2f} ms per token under it. End-to-end decode rows are in",
        "cpu_generate.md.",
        "",
        "Per-layer agreement of the exit token with full depth (held-out, no threshold):",
        "",
        "| head | " + " | ".join(f"layer {k}" for k in EXIT_LAYERS) + " |",
        "| --- | " + " | ".join("---" for _ in EXIT_LAYERS) + " |",
    ]
    for head in ("shared", "adapters"):
        per = next((r["per_layer_agreement"] for r in rows if r["head"] == head and r["per_layer_agreement"]), None)
        if per is not None:
            lines.append(f"| {head} | " + " | ".join(f"{a:.1%}" for a in per) + " |")
    lines += [
        "",
        "Thresholds (schedules) calibrated for each target on the calibration split, evaluated on the held-out split:",
        "",
        "| head | signal | target | calib. agreement | held-out agreement | mean layers | share of layers "
        "| ms per token |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['head']} | {r['measure']} | {r['target']:.3f} | {r['calib_agreement']:.2%} | "
            f"{r['agreement']:.2%} | {r['mean_layers']:.2f} | {r['layer_fraction']:.1%} | {r['ms_per_token']:.2f} |"
        )
    lines += ["", "Schedules chosen:", ""]
    lines += [f"- target {r['target']:.3f}: `{r['thresholds']}`" for r in rows if r["measure"] == "schedule"]
    lines += ["", "## Equal held-out agreement: the least expected time per token of each signal", ""]
    for level in (0.9, 0.95, 0.99):
        fastest = _best_time_at(rows, level)
        shared = fastest.get(("shared", "max_prob"))
        lines.append(f"- at >= {level:.0%} agreement:")
        for (head, measure), r in sorted(fastest.items(), key=lambda kv: kv[1]["ms_per_token"]):
            vs = f", {r['ms_per_token'] / shared['ms_per_token']:.2f}x shared max_prob" if shared else ""
            lines.append(
                f"  - {head}, {measure}: {r['ms_per_token']:.2f} ms ({r['ms_per_token'] / full_ms:.1%} of full "
                f"depth{vs}) at {r['agreement']:.2%}, {r['mean_layers']:.2f} layers"
            )
    lines += ["", "## Goal: at least 99% held-out agreement at no more than 75% of the layers (22.5)", ""]
    for key in sorted(_series(rows)):
        r = best.get(key)
        head, measure = key
        if r is None:
            lines.append(f"- {head}, {measure}: no setting reached 99% held-out agreement.")
        else:
            verdict = "met" if r["layer_fraction"] <= 0.75 else f"missed by {r['mean_layers'] - 22.5:.2f} layers"
            lines.append(
                f"- {head}, {measure}: {r['agreement']:.2%} at {r['mean_layers']:.2f} layers "
                f"({r['layer_fraction']:.1%}): {verdict}."
            )
    lines += ["", "## The cost models (measured in this run)", "", "```", meta["costs"], "```"]
    lines += ["", "![agreement vs layers and vs time](quality_smollm2.png)", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


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
    held_texts = builtin_corpus("held_out")
    t0 = time.time()
    if args.adapters:
        adapters = ExitAdapters.load(args.adapters, model=model)
        how = f"loaded from {args.adapters} (`train_exit_adapters`, library defaults, on the training split)"
    else:
        kw = {} if args.steps is None else {"steps": args.steps}
        adapters = train_exit_adapters(model, EXIT_LAYERS, adapter_texts, tokenizer=tokenizer, **kw)
        settings = "library defaults" + (f", steps={args.steps}" if args.steps else "")
        how = f"trained here in {time.time() - t0:.0f} s ({settings})"
    calib = collect_states(model, EXIT_LAYERS, split_windows(tokenizer, calib_texts, args.tokens), previous=True)
    held = collect_states(model, EXIT_LAYERS, split_windows(tokenizer, held_texts, args.tokens), previous=True)
    heads_by_name = {"shared": None, "adapters": adapters}
    costs, base = signal_costs(model, heads_by_name)
    rows = curves(model, heads_by_name, costs, calib, held)
    rows += schedule_rows(model, tokenizer, calib_texts, held_texts, args.tokens, base)
    os.makedirs(args.out, exist_ok=True)
    meta = dict(
        date=time.strftime("%Y-%m-%d"),
        machine=f"{os.cpu_count()} CPU cores ({_cpu_name()}), {torch.get_num_threads()} threads",
        command="python " + " ".join(["benchmarks/quality_smollm2.py", *(argv if argv is not None else sys.argv[1:])]),
        train_tokens="up to 16384",
        calib_tokens=calib[1].shape[0],
        held_tokens=held[1].shape[0],
        adapters=how,
        prompt_len=32,
        costs="\n\n".join(f"{name}, {kind} measures:\n{c}" for (name, kind), c in costs.items()),
    )
    write_markdown(rows, os.path.join(args.out, "quality_smollm2.md"), meta)
    plot(rows, os.path.join(args.out, "quality_smollm2.png"))
    print(f"wrote {args.out}/quality_smollm2.md and .png")


if __name__ == "__main__":
    sys.exit(main())
