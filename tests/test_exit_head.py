"""earlyexit.ExitHead: exit_check as an nn.Module over a model's head, by reference; from_model; the example."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models
import torch
from tiny_models import random_ids, tiny_causal_lm
from torch import nn

import earlyexit
from earlyexit import ExitHead, exit_check

ROOT = Path(__file__).resolve().parents[1]
#: The families from_model is checked on: Llama, Qwen3 and those whose heads differ (offset norm, softcap, scaling).
FROM_MODEL_KINDS = ("llama", "qwen3", *getattr(tiny_models, "FAMILY_KINDS", ()))


def head_tensors(n=5, d=24, v=97, dtype=torch.float32):
    hidden = torch.randn(n, d).to(dtype)
    weight = (torch.randn(v, d) / math.sqrt(d) * 4).to(dtype)
    norm_weight = (torch.rand(d) + 0.5).to(dtype)
    bias = torch.randn(v).to(dtype)
    return hidden, weight, norm_weight, bias


def assert_results_equal(got, want):
    for name, g, w in zip(got._fields, got, want):
        assert torch.equal(g.nan_to_num(), w.nan_to_num()), name


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(norm=True, bias=True, temperature=0.7, threshold=0.2),
        dict(norm=True, measure="margin", threshold=0.3),
        dict(norm=True, measure="entropy", threshold=2.0, bias=True),
        dict(norm=True, norm_offset=1.0, softcap=8.0, threshold=0.02),
        dict(norm=True, norm_eps=1e-3, threshold="per-row"),
    ],
    ids=["plain", "norm-bias-temperature", "margin", "entropy", "offset-softcap", "per-row-threshold"],
)
def test_equals_exit_check_with_the_same_arguments(kwargs):
    hidden, weight, norm_weight, bias = head_tensors()
    kw = dict(kwargs)
    norm, with_bias = kw.pop("norm", False), kw.pop("bias", False)
    if kw.get("threshold") == "per-row":
        kw["threshold"] = torch.linspace(0.05, 0.9, hidden.shape[0])
    kw.update(norm_weight=norm_weight if norm else None, bias=bias if with_bias else None)
    head = ExitHead(weight, **kw)
    threshold = kw.pop("threshold", 0.9)
    want = exit_check(hidden, weight, threshold, **kw)
    assert_results_equal(head(hidden), want)
    assert want.exit.any() or kwargs == {}  # the cases exercise the threshold


def test_threshold_per_call_and_settable():
    hidden, weight, norm_weight, _ = head_tensors(n=6)
    head = ExitHead(weight, norm_weight=norm_weight, threshold=0.5)
    for thr in (0.1, torch.full((6,), 0.3), torch.tensor(0.7)):
        assert_results_equal(head(hidden, threshold=thr), exit_check(hidden, weight, thr, norm_weight=norm_weight))
    assert head.threshold == 0.5  # a per-call threshold does not stick
    head.threshold = 0.2
    assert_results_equal(head(hidden), exit_check(hidden, weight, 0.2, norm_weight=norm_weight))
    leading = torch.randn(2, 3, hidden.shape[1])  # leading dims, as exit_check
    assert head(leading).token.shape == (2, 3)


def test_references_the_weights_never_copies():
    _, weight, norm_weight, bias = head_tensors()
    head = ExitHead(weight, norm_weight=norm_weight, bias=bias)
    assert head.weight is weight and head.norm_weight is norm_weight and head.bias is bias
    assert head.weight.data_ptr() == weight.data_ptr()
    # Not registered: no parameters, no buffers, nothing in the state dict.
    assert list(head.parameters()) == [] and list(head.buffers()) == [] and head.state_dict() == {}
    # .to() / .half() have nothing of the head's own to move: the referenced tensors stay as they are.
    assert head.half() is head and head.weight is weight and head.weight.dtype == torch.float32
    with pytest.raises(AttributeError):
        head.weight = torch.randn_like(weight)  # read-only: build a new head (free) instead


def test_inside_a_model_adds_no_state_and_follows_the_model():
    """An ExitHead over a model's parameters, attached to the model: the model's state dict and parameters are
    unchanged, and model.to() moves/casts the parameters in place, so the head follows without a copy."""
    d, v = 16, 50
    model = nn.Module()
    model.norm = nn.RMSNorm(d, eps=1e-6)
    model.lm_head = nn.Linear(d, v, bias=False)
    keys = set(model.state_dict())
    n_params = len(list(model.parameters()))
    model.exit_head = ExitHead(model.lm_head.weight, norm_weight=model.norm.weight, norm_eps=1e-6, threshold=0.0)
    assert set(model.state_dict()) == keys and len(list(model.parameters())) == n_params
    model.to(torch.bfloat16)
    head = model.exit_head
    assert head.weight is model.lm_head.weight and head.weight.dtype == torch.bfloat16
    assert head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    hidden = torch.randn(4, d, dtype=torch.bfloat16)
    want = exit_check(hidden, model.lm_head.weight, 0.0, norm_weight=model.norm.weight, norm_eps=1e-6)
    assert_results_equal(head(hidden), want)
    with pytest.raises(ValueError, match="weight"):
        head(hidden.float())  # a dtype (or device) other than the weight's is an error, never a silent cast


@pytest.mark.gpu
def test_follows_the_model_to_a_gpu():
    from earlyexit.hf.model_adapter import exit_head_args

    model = tiny_causal_lm("llama")
    head = ExitHead.from_model(model, threshold=0.0)
    model.to("cuda", torch.bfloat16)
    assert head.weight is model.lm_head.weight and head.weight.is_cuda and head.weight.dtype == torch.bfloat16
    hidden = torch.randn(3, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    assert_results_equal(head(hidden), exit_check(hidden, threshold=0.0, **exit_head_args(model)))


@pytest.mark.parametrize(
    "override, name",
    [
        (dict(weight="lm_head"), "weight"),
        (dict(weight=torch.randn(24)), "weight"),
        (dict(weight=torch.randint(0, 3, (97, 24))), "weight"),
        (dict(weight=torch.randn(24, 97).T), "weight"),
        (dict(weight=torch.randn(0, 24)), "weight"),
        (dict(norm_weight=torch.randn(23)), "norm_weight"),
        (dict(norm_weight=torch.randn(24, device="meta")), "norm_weight"),
        (dict(bias=torch.randn(96)), "bias"),
        (dict(norm_eps=-1.0), "norm_eps"),
        (dict(norm_offset=math.nan), "norm_offset"),
        (dict(norm_offset=1.0, norm_weight=None), "norm_offset"),
        (dict(softcap=0.0), "softcap"),
        (dict(softcap=-2.0), "softcap"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(measure="top1"), "measure"),
        (dict(threshold="high"), "threshold"),
        (dict(threshold=math.nan), "threshold"),
        (dict(threshold=torch.tensor([0.5, math.nan])), "threshold"),
        (dict(threshold=torch.tensor([True, False])), "threshold"),
    ],
)
def test_bad_arguments_raise_eagerly_naming_them(override, name):
    _, weight, norm_weight, bias = head_tensors()
    kw = dict(weight=weight, norm_weight=norm_weight, bias=bias)
    kw.update(override)
    with pytest.raises(ValueError, match=name):
        ExitHead(kw.pop("weight"), **kw)


def test_nan_thresholds_later_raise():
    hidden, weight, _, _ = head_tensors()
    head = ExitHead(weight)
    with pytest.raises(ValueError, match="threshold"):
        head.threshold = math.nan
    with pytest.raises(ValueError, match="threshold"):
        head(hidden, threshold=math.nan)
    with pytest.raises(ValueError, match="threshold"):
        head(hidden, threshold=torch.full((hidden.shape[0],), math.nan))
    assert head.threshold == 0.9


def test_torch_compile_fullgraph():
    hidden, weight, norm_weight, bias = head_tensors()
    head = ExitHead(weight, norm_weight=norm_weight, bias=bias, softcap=5.0, measure="margin", threshold=0.2)

    def step(h, thr=None):
        r = head(h * 2, threshold=thr)
        return r.token.where(r.exit, -2), r.confidence

    compiled = torch.compile(step, fullgraph=True)
    for thr in (None, 0.1, torch.full((hidden.shape[0],), 0.3)):
        got, want = compiled(hidden, thr), step(hidden, thr)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("kind", FROM_MODEL_KINDS)
def test_from_model_gives_the_models_own_greedy_token(kind):
    model = tiny_causal_lm(kind)
    head = ExitHead.from_model(model, threshold=0.0)
    assert head.weight is model.lm_head.weight  # the model's parameter itself
    ids = random_ids(2 * 9, seed=3).view(2, 9)
    final_states = []
    hook = model.model.norm.register_forward_hook(lambda mod, args, out: final_states.append(args[0]))
    try:
        with torch.no_grad():
            logits = model(ids).logits[:, -1]
    finally:
        hook.remove()
    result = head(final_states[-1][:, -1])
    assert torch.equal(result.token, logits.argmax(-1))
    # The statistics too: the softcap, norm offset and logit scaling are the model's.
    torch.testing.assert_close(result.max_prob, logits.float().softmax(-1).amax(-1), rtol=1e-4, atol=1e-5)
    assert bool(result.exit.all())


def test_from_model_passes_a_vocabulary_shard_through(monkeypatch):
    """A vocabulary-sharded head (what exit_head_args returns under tensor parallelism): ExitHead holds this
    rank's rows and hands the shard arguments to exit_check. Here one process, so no group: a slice of a
    larger vocabulary, whose tokens are global ids."""
    from earlyexit.hf import model_adapter

    hidden, weight, norm_weight, _ = head_tensors()
    args = dict(weight=weight, bias=None, norm_weight=norm_weight, norm_eps=1e-6, norm_offset=0.0, softcap=None)
    args.update(temperature=1.0, vocab_start=100, vocab_size=100 + weight.shape[0] - 7)  # 7 rows of padding
    monkeypatch.setattr(model_adapter, "exit_head_args", lambda model: dict(args))
    head = ExitHead.from_model(object(), threshold=0.3)
    assert head.sharded and head.weight is weight
    want = exit_check(hidden, weight, 0.3, norm_weight=norm_weight, vocab_start=100, vocab_size=args["vocab_size"])
    got = head(hidden)
    assert_results_equal(got, want)
    assert bool((got.token >= 100).all())


def test_from_model_refuses_unknown_head_arguments(monkeypatch):
    from earlyexit.hf import model_adapter

    _, weight, _, _ = head_tensors()
    monkeypatch.setattr(model_adapter, "exit_head_args", lambda model: dict(weight=weight, logit_bias_mode=1))
    with pytest.raises(ValueError, match="logit_bias_mode"):
        ExitHead.from_model(object())


def test_importing_earlyexit_does_not_import_transformers():
    code = "import sys, earlyexit; earlyexit.ExitHead; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_exported():
    assert "ExitHead" in earlyexit.__all__ and earlyexit.ExitHead is ExitHead


def test_custom_decoder_example_runs_and_checks_itself():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_decoder.py"), "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = [line for line in proc.stdout.splitlines() if line.startswith("check:")]
    assert len(checks) == 3 and all(line.endswith(": ok") for line in checks), proc.stdout
    assert "skipped" in proc.stdout
