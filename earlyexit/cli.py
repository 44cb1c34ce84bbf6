"""Command line: ``earlyexit demo`` and friends (also ``python -m earlyexit.cli``)."""

import argparse


def main(argv=None):
    p = argparse.ArgumentParser(prog="earlyexit", description="Fused kernels for early-exit LLM inference")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("demo", "kernel-demo"):
        k = sub.add_parser(name, help="run the fused exit check on a real-sized head against the reference")
        k.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        k.add_argument("--rows", default="1,8,64", help="comma-separated batch sizes")
    sub.add_parser("env", help="print build_info(): versions, compiled parts, runnable backends")
    args = p.parse_args(argv)
    if args.command in ("demo", "kernel-demo"):
        from earlyexit.kernel_demo import kernel_demo

        kernel_demo(args.device, rows=tuple(int(x) for x in args.rows.split(",")))
    elif args.command == "env":
        from earlyexit.env import main as env_main

        env_main([])


if __name__ == "__main__":
    main()
