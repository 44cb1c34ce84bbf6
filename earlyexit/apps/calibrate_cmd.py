"""``earlyexit calibrate --out DIR [--model PATH]``: train exit adapters for SmolLM2 (or a local model),
calibrate thresholds, save both."""

import json
import os
import sys
import time

import torch

from earlyexit.apps.model_loading import default_exit_layers, load_model
from earlyexit.apps.policy_cache import policy_record
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
    out_dir,
    exit_layers=None,
    *,
    target_agreement=0.99,
    measure="max_prob",
    objective="time",
    steps=None,
    out=None,
    model=None,
    max_tokens=None,
):
    """Train adapters on Python's pydoc text, calibrate thresholds on held-apart text, save to ``out_dir``.

    exit_layers: the layers to train adapters for; None: 40%, 60% and 80% of the model's depth.
    objective: as :func:`earlyexit.calibrate` ("time" may keep fewer exit layers than were trained; the
    saved policy names the kept ones).
    model: None (SmolLM2) or the path of a local model folder or .gguf file
    (:func:`~earlyexit.apps.model_loading.load_model`; ValueError for a bad path), loaded in float32 on the CPU.
    max_tokens: the token budget of the training text and of the calibration text (None: the library's).
    """
    out = out or sys.stdout
    path = model
    loaded = load_model(path, dtype=torch.float32)  # as the demo's default (SmolLM2's GGUF loads as float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    if exit_layers is None:
        exit_layers = default_exit_layers(model.config.num_hidden_layers)
    train = builtin_corpus("train")
    t0 = time.time()
    budget = {} if max_tokens is None else {"max_tokens": max_tokens}
    kw = dict(budget) if steps is None else dict(budget, steps=steps)
    adapters = train_exit_adapters(model, exit_layers, train[0::2], tokenizer=tokenizer, **kw)
    print(f"trained adapters for layers {list(exit_layers)} in {time.time() - t0:.0f} s", file=out)
    eem = EarlyExitLM(model, exit_layers, measure=measure, heads=adapters)
    _, report = calibrate(
        eem, train[1::2], target_agreement=target_agreement, tokenizer=tokenizer, objective=objective, **budget
    )
    os.makedirs(out_dir, exist_ok=True)
    adapters.save(out_dir)
    save_thresholds(out_dir, eem, report)
    print(f"calibrated on the calibration split: {report}", file=out)
    use = f"earlyexit demo --heads {out_dir}" + ("" if path is None else f" --model {loaded.source}")
    print(f"wrote {out_dir}: adapters and {THRESHOLDS_FILE}; use: {use}", file=out)
    return adapters, report
