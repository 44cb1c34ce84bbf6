"""``earlyexit calibrate --out DIR``: train exit adapters for SmolLM2, calibrate thresholds, save both."""

import json
import os
import sys
import time

from earlyexit.apps.policy_cache import policy_record
from earlyexit.apps.smollm2 import load_smollm2
from earlyexit.hf.early_exit_lm import EarlyExitLM
from earlyexit.tuning.adapters import ExitAdapters, train_exit_adapters
from earlyexit.tuning.calibrate import calibrate
from earlyexit.tuning.text_data import builtin_corpus

THRESHOLDS_FILE = "thresholds.json"


def save_thresholds(folder, eem, report):
    """Write the calibrated exit policy (layers, measure, thresholds, what they achieved) as JSON."""
    with open(os.path.join(folder, THRESHOLDS_FILE), "w") as f:
        json.dump(policy_record(eem, report), f, indent=2)


def load_heads(folder, model=None):
    """(adapters, policy dict or None) saved by ``earlyexit calibrate`` in ``folder``; checked against ``model``."""
    adapters = ExitAdapters.load(folder, model=model)
    path = os.path.join(folder, THRESHOLDS_FILE)
    policy = None
    if os.path.isfile(path):
        with open(path) as f:
            policy = json.load(f)
    return adapters, policy


def run_calibrate(
    out_dir, exit_layers, *, target_agreement=0.99, measure="max_prob", objective="time", steps=None, out=sys.stdout
):
    """Train adapters on Python's pydoc text, calibrate thresholds on held-apart text, save to ``out_dir``.

    objective: as :func:`earlyexit.calibrate` ("time" may keep fewer exit layers than were trained; the
    saved policy names the kept ones).
    """
    model, tokenizer = load_smollm2()
    train = builtin_corpus("train")
    t0 = time.time()
    kw = {} if steps is None else {"steps": steps}
    adapters = train_exit_adapters(model, exit_layers, train[0::2], tokenizer=tokenizer, **kw)
    print(f"trained adapters for layers {list(exit_layers)} in {time.time() - t0:.0f} s", file=out)
    eem = EarlyExitLM(model, exit_layers, measure=measure, heads=adapters)
    _, report = calibrate(eem, train[1::2], target_agreement=target_agreement, tokenizer=tokenizer, objective=objective)
    os.makedirs(out_dir, exist_ok=True)
    adapters.save(out_dir)
    save_thresholds(out_dir, eem, report)
    print(f"calibrated on the calibration split: {report}", file=out)
    print(f"wrote {out_dir}: adapters and {THRESHOLDS_FILE}; use: earlyexit demo --heads {out_dir}", file=out)
    return adapters, report
