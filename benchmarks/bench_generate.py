"""End-to-end decode benchmark: full depth, exit mode (every exit signal) and exact mode, side by side in one run.

GPU: random-weight Llama models at real sizes built from config classes (about 1B: d=2048, 16
layers; about 8B: d=4096, 32 layers; V=128256), bf16, batch 1, 8 and 32. One exit check at the
middle layer, its threshold set from the confidence quantiles measured on the same model so that
about 0, 25, 50 and 75% of tokens exit there (the realized rate is reported). The head-free signals
run beside them: the state measure (cos(h_k, h_(k-1)) at the same layer, its threshold set the same way
for 50%; the head runs only where a row exits) and a SkipDecode position schedule from L down to that
layer over the generated tokens (no exit checks at all). CPU: SmolLM2-135M (float32), the same sweep
at batch 1 and 4.

Reported per row: the mean decode step time (a call's time minus that of a one-token call with the same
prompt made just before it in the same round, over the new tokens but the first: the prompt's prefill
and the first token, reported beside it, do not dilute the step; the median over the rounds), decode
tokens/s from it; the step relative to model.generate's (full depth) in the same round, its median over
the rounds (step_vs_full) and their range (lo, hi: the run's own noise), and the realized saving
(1 - step_vs_full) next to the ideal saving from the layers skipped (exit rate x share of layers after
the exit); the share of step time spent in exit checks; for exact mode, the
acceptance rate; for every row, the share of generated tokens equal to model.generate's at the same
position (prompts are random tokens, so after a first difference the continuations usually part).
"ee-full" is EarlyExitLM with an unreachable threshold: its gap to model.generate is the overhead of
the early-exit machinery when nothing exits.

Usage: python benchmarks/bench_generate.py [--quick] [--device cuda] [--new-tokens N] [--repeats R] [--out DIR]
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import environment, format_table, synchronize, timed_rounds, write_csv  # noqa: E402

from earlyexit import EarlyExitLM, SkipDecodeSchedule  # noqa: E402
from earlyexit.tuning.calibrate import exit_scores  # noqa: E402

RATES = [0.0, 0.25, 0.5, 0.75]
GPU_MODELS = {
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32),
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32),
}


def random_llama(spec, device, dtype):
    """A random-weight LlamaForCausalLM (V=128256) built directly on ``device`` in ``dtype``."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=128256, max_position_embeddings=4096, num_key_value_heads=8, **spec)
    config._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.generation_config.pad_token_id = 0
    return model.eval()


def threshold_for_rate(model, exit_layer, rate, vocab, device, measure="max_prob"):
    """The ``measure`` threshold that about ``rate`` of teacher-forced random-text positions pass at ``exit_layer``."""
    if rate <= 0:
        return 2.0  # unreachable: nothing exits (max_prob and cosine similarity are <= 1)
    ids = torch.randint(1, vocab, (4, 64), generator=torch.Generator().manual_seed(1))
    eem = EarlyExitLM(model, [exit_layer], measure=measure)
    scores = exit_scores(eem, ids, seq_len=64, progress=False).scores[0]
    return torch.quantile(scores[torch.isfinite(scores)], 1 - rate).item()


def paired_steps(makers, new_tokens, device, repeats):
    """Per-round decode steps of each maker, from a one-token call and a ``new_tokens`` call back to back.

    makers: {label: make(n) -> output}, timed in interleaved, rotated rounds (:func:`timed_rounds`, whose
    warm-up run is dropped). Returns {label: (output of the last new_tokens call, step seconds per
    round [repeats], seconds of the one-token call per round [repeats])}; a step is the difference of
    the two calls over new_tokens - 1 (0 when noise makes it negative).
    """
    record = {label: [] for label in makers}

    def paired(label, make):
        def run():
            synchronize(device)
            t0 = time.perf_counter()
            make(1)
            synchronize(device)
            t1 = time.perf_counter()
            out = make(new_tokens)
            synchronize(device)
            t2 = time.perf_counter()
            record[label].append((max(t2 - t1 - (t1 - t0), 0.0) / (new_tokens - 1), t1 - t0))
            return out

        return run

    timed = timed_rounds({label: paired(label, make) for label, make in makers.items()}, device, repeats)
    return {
        label: (timed[label][0], [s for s, _ in record[label][1:]], [f for _, f in record[label][1:]])
        for label in makers
    }


def _ratio(steps, base):
    """(median, min, max) over rounds of steps[r] / base[r] (None where a base step is 0)."""
    ratios = [s / b for s, b in zip(steps, base) if b > 0]
    return (statistics.median(ratios), min(ratios), max(ratios)) if ratios else (None, None, None)


def bench_model(name, model, device, batches, rates, new_tokens, repeats, prompt_len=32):
    rows = []
    layers = model.config.num_hidden_layers
    exit_layer = layers // 2
    vocab = model.config.vocab_size
    thresholds = {r: threshold_for_rate(model, exit_layer, r, vocab, device) for r in rates}
    state_threshold = threshold_for_rate(model, exit_layer, 0.5, vocab, device, measure="state")
    schedule = SkipDecodeSchedule(layers, exit_layer, horizon=new_tokens - 1)
    for batch in batches:
        ids = torch.randint(1, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch)).to(device)
        # Each maker makes (n tokens -> output); it is timed at new_tokens and at 1 token: the difference
        # is new_tokens - 1 decode steps, without the prompt's prefill and the first token.
        makers = {
            "hf-generate": lambda n, ids=ids: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        }
        configs = [("ee-full", 2.0, "exit", None)] + [
            (f"exit@{r:.0%}", thresholds[r], "exit", r) for r in rates if r > 0
        ]
        configs += [(f"exact@{r:.0%}", thresholds[r], "exact", r) for r in rates if r > 0][-1:]
        configs += [
            ("state@50%", state_threshold, "exit", 0.5),
            (f"schedule {layers}->{exit_layer}", None, "exit", None),
        ]
        for label, thr, mode, _ in configs:
            if label.startswith("schedule"):
                eem = EarlyExitLM(model, schedule=schedule)
            else:
                eem = EarlyExitLM(
                    model, [exit_layer], threshold=thr, measure="state" if label.startswith("state") else "max_prob"
                )
            # No end of sequence: every row decodes exactly n tokens, as model.generate with min_new_tokens.
            makers[label] = lambda n, eem=eem, mode=mode, ids=ids: eem.generate(
                ids, max_new_tokens=n, mode=mode, eos_token_id=[]
            )
        timed = paired_steps(makers, new_tokens, device, repeats)

        greedy, base_steps, base_firsts = timed["hf-generate"]
        greedy = greedy[:, prompt_len:]
        base_step, base_first = statistics.median(base_steps), statistics.median(base_firsts)
        rows.append(
            dict(
                model=name,
                batch=batch,
                mode="hf-generate",
                target_rate=None,
                exit_rate=0.0,
                step_ms=base_step * 1e3,
                prefill_ms=base_first * 1e3,
                tokens_per_s=batch / base_step,
                agreement=1.0,
            )
        )
        for label, _, mode, rate in configs:
            out, steps, firsts = timed[label]
            stats = out.stats
            exited = stats["tokens_per_exit_layer"].get(exit_layer, 0) / max(stats["new_tokens"], 1)
            step, first = statistics.median(steps), statistics.median(firsts)
            vs_full, lo, hi = _ratio(steps, base_steps)
            # The layers not run, as a share of full depth (the schedule's exits are at every depth).
            ideal = 1 - stats["mean_layers_per_token"] / layers
            rows.append(
                dict(
                    model=name,
                    batch=batch,
                    mode=label,
                    target_rate=rate,
                    exit_rate=exited,
                    step_ms=step * 1e3,
                    prefill_ms=first * 1e3,
                    tokens_per_s=batch / step if step > 0 else None,
                    saving=None if vs_full is None else 1 - vs_full,
                    ideal_saving=ideal if mode == "exit" else None,
                    step_vs_full=vs_full,
                    step_vs_full_lo=lo,
                    step_vs_full_hi=hi,
                    agreement=(out.sequences[:, prompt_len:] == greedy).float().mean().item(),
                    head_rows_per_token=stats["head_rows"] / max(stats["new_tokens"], 1),
                    exit_check_share=stats.get("exit_check_time_share"),
                    acceptance=stats.get("acceptance_rate"),
                    mean_layers=stats["mean_layers_per_token"],
                )
            )
        print(format_table(rows[-len(configs) - 1 :], list(rows[-1])), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smaller sweep (the GPU check script uses this)")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="interleaved timed rounds (medians and the range of the per-round ratios are reported)",
    )
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args(argv)
    if args.new_tokens is not None and args.new_tokens < 2:
        p.error(f"--new-tokens: at least 2 (a step is the call's time minus a one-token call's), got {args.new_tokens}")
    device = torch.device(args.device)
    env = environment(device)
    rows = []
    if device.type == "cuda":
        models = ["llama-1b"] if args.quick else list(GPU_MODELS)
        batches = [1, 8] if args.quick else [1, 8, 32]
        rates = [0.0, 0.5] if args.quick else RATES
        for name in models:
            model = random_llama(GPU_MODELS[name], device, torch.bfloat16)
            rows += bench_model(name, model, device, batches, rates, args.new_tokens or 32, args.repeats)
            del model
            torch.cuda.empty_cache()
    else:
        from earlyexit.apps.smollm2 import load_smollm2

        model, _ = load_smollm2()
        rows += bench_model(
            "smollm2-135m",
            model,
            device,
            [1] if args.quick else [1, 4],
            [0.0, 0.5] if args.quick else RATES,
            args.new_tokens or (8 if args.quick else 16),
            args.repeats,
        )
    for r in rows:
        r.update(env)
    cols = ["model", "batch", "mode", "exit_rate", "step_ms", "prefill_ms", "tokens_per_s", "saving", "ideal_saving"]
    cols += ["step_vs_full", "step_vs_full_lo", "step_vs_full_hi"]
    print(format_table(rows, cols + ["exit_check_share", "acceptance", "agreement", "head_rows_per_token"]))
    stem = f"generate_{env['device']}_torch{env['torch']}".replace("+", "_")
    write_csv(os.path.join(args.out, stem + ".csv"), rows)
    print(f"wrote {os.path.join(args.out, stem)}.csv")


if __name__ == "__main__":
    main()
