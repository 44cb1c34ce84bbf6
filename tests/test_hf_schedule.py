"""Position schedules (SkipDecode) in EarlyExitLM, and calibrate_schedule, on random-weight tiny Llama and Qwen3.

The oracle is transformers itself. A schedule is non-increasing, so every layer a position runs reads
only cache entries that earlier positions computed: the hidden state after schedule(t) layers is the
full model's on the generated sequence. One forward with output_hidden_states over the output then
gives every token (final norm, lm_head, argmax at layer schedule(t)), every computed cache entry (the
model's own cache) and every propagated one (the HF modules' k/v of that hidden state).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_generate import (  # noqa: E402
    _first_step_states,
    _propagated,
    _reference,
    assert_cache_is_the_models_own,
)
from tiny_models import left_padded_batch, random_ids, tiny_causal_lm  # noqa: E402

from earlyexit import EarlyExitLM, SkipDecodeSchedule, calibrate_schedule  # noqa: E402
from earlyexit.tuning.schedule_calibration import schedule_family  # noqa: E402

L = 6
T = 7


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request):
    return tiny_causal_lm(request.param, num_layers=L)


@pytest.fixture(scope="module")
def batch():
    """Three prompts of lengths 7, 4 and 2 (T = 7), left-padded with token 0."""
    return left_padded_batch()


def _head_token(model, hidden, k):
    """Greedy token of hidden states after k layers (HF's last hidden state already has the final norm)."""
    return model.lm_head(hidden if k == L else model.model.norm(hidden)).argmax(-1)


def assert_schedule_output_is_direct(model, out, am, depths):
    """Every generated token, exit layer and cache entry of a schedule run equals the direct computation."""
    generated = out.exit_layer > 0
    with torch.no_grad():
        hidden, hf_cache, pos = _first_step_states(model, out.sequences, torch.cat([am, generated.long()], 1))
    for r in range(am.shape[0]):
        count = int(generated[r].sum())
        assert out.exit_layer[r, :count].tolist() == depths[:count], f"row {r}"
        assert (out.exit_layer[r, count:] == 0).all() and (out.sequences[r, T + count :] == 0).all()
        for t in range(count):
            p, d = T - 1 + t, depths[t]
            with torch.no_grad():
                want = _head_token(model, hidden[d][r, p], d)
            assert int(out.sequences[r, T + t]) == int(want), f"row {r} position {t}"
            if t == count - 1:  # the last generated token is not cached
                break
            h = hidden[d][r : r + 1, p : p + 1]
            cos, sin = model.model.rotary_emb(h, pos[r : r + 1, p : p + 1])
            for idx in range(L):
                got_k, got_v = out.cache.layers[idx].keys[r, :, p], out.cache.layers[idx].values[r, :, p]
                if idx < d:  # computed by the layer: the model's own cache
                    want_k, want_v = hf_cache.layers[idx].keys[r, :, p], hf_cache.layers[idx].values[r, :, p]
                else:  # skipped: state propagation of the hidden state after d layers
                    with torch.no_grad():
                        want_k, want_v = (x[0] for x in _propagated(model, idx, h, cos, sin))
                msg = f"row {r} position {t} layer {idx}"
                torch.testing.assert_close(got_k, want_k, rtol=1e-4, atol=1e-4, msg=msg)
                torch.testing.assert_close(got_v, want_v, rtol=1e-4, atol=1e-4, msg=msg)
        # The prompt is prefilled at full depth (its last position ran depths[0] layers, checked above).
        for idx in range(L):
            real = am[r, : T - 1].bool()
            got = out.cache.layers[idx].keys[r, :, : T - 1][:, real]
            torch.testing.assert_close(got, hf_cache.layers[idx].keys[r, :, : T - 1][:, real], rtol=1e-4, atol=1e-4)


def test_full_depth_schedule_equals_generate(model, batch):
    ids, am = batch
    n = 10
    ref = _reference(model, ids, am, n)
    for schedule in (SkipDecodeSchedule(L, L), [L], lambda t: L):
        out = EarlyExitLM(model, schedule=schedule).generate(ids, am, max_new_tokens=n)
        assert torch.equal(out.sequences, ref)
        assert (out.exit_layer == L).all()
        assert out.stats["head_rows"] == 3 * n and out.stats["exit_check_time_share"] == 0
        assert out.stats["propagated_layer_rows"] == 0 and abs(out.stats["layer_compute_skipped"]) < 1e-12
    assert_cache_is_the_models_own(model, out, am)


def test_schedule_tokens_and_cache_are_the_direct_computation(model, batch):
    ids, am = batch
    n = 9
    schedule = SkipDecodeSchedule(L, 2, warmup=1, horizon=5)
    depths = schedule.layers(n)
    assert depths == [6, 6, 5, 4, 3, 2, 2, 2, 2]
    out = EarlyExitLM(model, schedule=schedule).generate(ids, am, max_new_tokens=n)
    assert (out.exit_layer == torch.tensor(depths)).all(), "exit_layer[:, t] == schedule(t) in every row"
    assert_schedule_output_is_direct(model, out, am, depths)
    stats = out.stats
    assert stats["head_rows"] == 3 * n, "the head runs once per token"
    assert stats["exit_check_time_share"] == 0
    assert stats["propagated_layer_rows"] == 3 * sum(L - d for d in depths)
    assert stats["mean_layers_per_token"] == pytest.approx(sum(depths) / n)
    assert stats["layer_compute_skipped"] == pytest.approx(1 - sum(depths) / (L * n))
    assert stats["tokens_per_exit_layer"][2] == 3 * depths.count(2)


def test_eos_and_schedule_per_call(model, batch):
    """A call's schedule overrides the EarlyExitLM's exit checks; rows that end stop and are padded."""
    ids, am = batch
    n = 8
    schedule = SkipDecodeSchedule(L, 3, horizon=4, decay="cosine")
    eem = EarlyExitLM(model, [2, 4], threshold=0.1)
    free = eem.generate(ids, am, max_new_tokens=n, schedule=schedule)
    eos = int(free.sequences[0, T + 2])  # row 0 stops after 3 tokens (maybe others too)
    out = eem.generate(ids, am, max_new_tokens=n, eos_token_id=eos, schedule=schedule)
    assert (out.exit_layer[0, 3:] == 0).all() and (out.sequences[0, T + 3 :] == 0).all()
    assert (out.exit_layer[1:, 3:] > 0).any(), "another row should go on, else the test is vacuous"
    for r in range(3):  # positions are shared, so every row's tokens up to its end are those of the free run
        count = int((out.exit_layer[r] > 0).sum())
        assert torch.equal(out.sequences[r, : T + count], free.sequences[r, : T + count])
    assert out.stats["head_rows"] == out.stats["new_tokens"] == int((out.exit_layer > 0).sum())
    assert_schedule_output_is_direct(model, out, am, schedule.layers(n))
    assert eem.schedule is None and (eem.generate(ids, am, max_new_tokens=2).stats["exit_check_time_share"] > 0)


def test_custom_schedules_equal_their_values(model, batch):
    ids, am = batch
    want = EarlyExitLM(model, schedule=SkipDecodeSchedule(L, 3, horizon=3)).generate(ids, am, max_new_tokens=6)
    values = SkipDecodeSchedule(L, 3, horizon=3).layers(6)
    for schedule in (lambda t: values[t], values[:4], torch.tensor(values)):
        out = EarlyExitLM(model, schedule=schedule).generate(ids, am, max_new_tokens=6)
        assert torch.equal(out.sequences, want.sequences) and torch.equal(out.exit_layer, want.exit_layer)


def test_sampling(model, batch):
    ids, am = batch
    schedule = SkipDecodeSchedule(L, 2, horizon=4)
    eem = EarlyExitLM(model, schedule=schedule)
    greedy = eem.generate(ids, am, max_new_tokens=6)
    tiny = eem.generate(ids, am, max_new_tokens=6, do_sample=True, top_p=1e-6)
    assert torch.equal(tiny.sequences, greedy.sequences), "top_p -> 0 keeps the argmax"
    torch.manual_seed(0)
    out = eem.generate(ids, am, max_new_tokens=6, do_sample=True, temperature=0.8)
    assert out.sequences.shape == (3, T + 6) and ((out.sequences >= 0) & (out.sequences < 300)).all()
    assert (out.exit_layer == torch.tensor(schedule.layers(6))).all() and out.stats["head_rows"] == 18


def test_exact_mode_ignores_the_schedule_and_refuses_one(model, batch):
    ids, am = batch
    eem = EarlyExitLM(model, [2], threshold=0.1, schedule=SkipDecodeSchedule(L, 2))
    assert torch.equal(eem.generate(ids, am, max_new_tokens=5, mode="exact").sequences, _reference(model, ids, am, 5))
    with pytest.raises(ValueError, match="^schedule: exact mode"):
        eem.generate(ids, am, max_new_tokens=5, mode="exact", schedule=SkipDecodeSchedule(L, 2))


def test_errors(batch):
    model = tiny_causal_lm("llama", num_layers=L)
    ids, am = batch
    with pytest.raises(ValueError, match="^schedule: max_layers=7"):
        EarlyExitLM(model, schedule=SkipDecodeSchedule(L + 1, 2))
    with pytest.raises(ValueError, match="^exit_layers"):
        EarlyExitLM(model)
    for bad in ("fast", 4, [6, 7], [4, 5], []):
        with pytest.raises(ValueError, match="^schedule"):
            EarlyExitLM(model, schedule=bad)
    eem = EarlyExitLM(model, [2, 4])
    bad_calls = [
        SkipDecodeSchedule(L + 1, 2),  # max_layers > L
        lambda t: 2 + t,  # increasing
        lambda t: 4 if t < 2 else 5,  # increasing later on, within the call's positions
        lambda t: float("nan"),
        lambda t: 2.5,
        lambda t: 0,
        lambda t: L + 1,
    ]
    for bad in bad_calls:
        with pytest.raises(ValueError, match="^schedule"):
            eem.generate(ids, am, max_new_tokens=4, schedule=bad)
    eem.generate(ids, am, max_new_tokens=2, schedule=lambda t: 4 if t < 2 else 5)  # increases after the call
    for bad in (0, L + 1):
        with pytest.raises(ValueError, match="^min_layers"):
            SkipDecodeSchedule(L, bad)
    with pytest.raises(ValueError, match="^decay"):
        SkipDecodeSchedule(L, 2, decay="step")


# ---------------------------------------------------------------- calibrate_schedule

SEQ, PROMPT = 32, 8
N = SEQ - PROMPT + 1


@pytest.fixture(scope="module")
def calibration(model):
    """Data, and the direct per-layer agreement table: correct[k][w, t] = layer-k token == full-depth token."""
    data = random_ids(8 * SEQ, 5)
    with torch.no_grad():
        hidden = model(data.view(-1, SEQ), output_hidden_states=True).hidden_states
    tokens = [_head_token(model, hidden[k][:, PROMPT - 1 :], k) for k in range(L + 1)]
    return data, [tok == tokens[L] for tok in tokens]


def _agreement(correct, schedule):
    depths = schedule.layers(N)
    return torch.stack([correct[d][:, t] for t, d in enumerate(depths)], 1).double().mean().item()


@pytest.mark.parametrize("target", [0.2, 0.5, 0.8, 0.95])
def test_calibrate_schedule_is_the_steepest_meeting_the_target(model, calibration, target):
    data, correct = calibration
    eem = EarlyExitLM(model, schedule=SkipDecodeSchedule(L, L))
    schedule = calibrate_schedule(eem, data, target_agreement=target, seq_len=SEQ, prompt_len=PROMPT, progress=False)
    assert eem.schedule is schedule and isinstance(schedule, SkipDecodeSchedule) and schedule.max_layers == L
    report = schedule.report
    assert report.agreement == pytest.approx(_agreement(correct, schedule)) and report.agreement >= target
    assert report.mean_layers == pytest.approx(schedule.mean_layers(N)) and report.positions == N
    assert report.windows == 8 and len(report.per_position) == N
    # Nothing in the family with fewer mean layers meets the target (by the direct agreement).
    family = schedule_family(L, N)
    assert report.candidates == len(family)
    for s in family:
        if s.mean_layers(N) < report.mean_layers - 1e-9:
            assert _agreement(correct, s) < target, s
    if target <= 0.5:
        assert report.mean_layers < L, "a low target on this model should skip layers"
    out = eem.generate(data[: 2 * SEQ].view(2, SEQ)[:, :PROMPT], max_new_tokens=4)
    assert out.exit_layer.tolist() == [schedule.layers(4)] * 2


def test_calibrate_schedule_full_agreement_is_full_depth(model, calibration):
    data, correct = calibration
    # On this data no shallower layer agrees in every window at the last position (where every member of
    # the family but full depth has reached its min_layers), so target 1.0 is full depth.
    assert not any(bool(correct[m][:, -1].all()) for m in range(1, L))
    eem = EarlyExitLM(model, schedule=SkipDecodeSchedule(L, 2))
    schedule = calibrate_schedule(eem, data, target_agreement=1.0, seq_len=SEQ, prompt_len=PROMPT, progress=False)
    assert schedule == SkipDecodeSchedule(L, L) and schedule.report.agreement == 1.0
    for bad in (0, 1.5, float("nan"), "high", None):
        with pytest.raises(ValueError, match="^target_agreement"):
            calibrate_schedule(eem, data, target_agreement=bad, seq_len=SEQ, prompt_len=PROMPT, progress=False)
    with pytest.raises(ValueError, match="^prompt_len"):
        calibrate_schedule(eem, data, target_agreement=0.9, seq_len=SEQ, prompt_len=SEQ, progress=False)
