"""``python -m earlyexit.env``: print what is built and which backends can run here."""

import json

from earlyexit.ops.backends import build_info


def format_build_info(info):
    """A human-readable multi-line summary of :func:`earlyexit.build_info`."""
    lines = [
        f"earlyexit {info['version']}",
        f"torch {info['torch']} (CUDA {info['torch_cuda']}), CUDA device available: {info['cuda_available']}",
        f"triton {info['triton']} (TRITON_INTERPRET={int(info['triton_interpret'])})",
        f"C++ extension: {'built' if info['cpu_ext'] else 'not built'}; CUDA archs: {info['cuda_archs'] or 'none'}",
        f"CPU bf16 head: {info['cpu_bf16_dots'] or 'no C++ kernel'}",
        "backends:",
    ]
    for name, per_dev in info["backends"].items():
        for dev, reason in per_dev.items():
            lines.append(f"  {name:6s} on {dev:4s}: {'runs' if reason is None else 'no - ' + reason}")
    return "\n".join(lines)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m earlyexit.env", description=__doc__)
    p.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    args = p.parse_args(argv)
    info = build_info()
    print(json.dumps(info, indent=2) if args.json else format_build_info(info))


if __name__ == "__main__":
    main()
