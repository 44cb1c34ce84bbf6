"""Cost-aware calibration (objective="time"): the search on synthetic scores and costs, and calibrate end to end
on a small random-weight Llama (CPU, seconds)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import random_ids, tiny_causal_lm  # noqa: E402

from earlyexit import CostModel, EarlyExitLM, calibrate  # noqa: E402
from earlyexit.tuning.calibrate import ExitScores, choose_thresholds, exit_scores, report_for, simulate  # noqa: E402
from earlyexit.tuning.time_objective import expected_time, search_policy, time_policy  # noqa: E402

EXITS = [2, 4]


def _costs(exit_layers, num_layers, check=0.5, head=2.0, layer=1.0, propagate=0.25):
    """A one-row-count CostModel in units of one layer."""
    return CostModel(
        rows=(1,),
        layer=(layer,),
        head=(head,),
        exit_check={k: (check,) for k in exit_layers},
        propagate=(propagate,),
        verify_position=(0.1,),
        num_layers=num_layers,
        context=32,
        device="cpu",
        dtype="float32",
    )


def _scores(scores, correct, exit_layers, num_layers=10):
    return ExitScores(torch.stack(scores), torch.stack(correct), exit_layers, num_layers, "max_prob")


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama", num_layers=6)


def test_expected_time_is_the_sum_over_tokens():
    # L = 10, exit layers 3 and 6; 4 tokens: exits at 3, at 6, and two at full depth.
    scores = _scores(
        [torch.tensor([0.9, 0.1, 0.1, 0.1]), torch.tensor([0.0, 0.9, 0.1, 0.1])],
        [torch.ones(4, dtype=torch.bool)] * 2,
        [3, 6],
    )
    costs = _costs([3, 6], 10, check=0.5, head=2.0, layer=1.0, propagate=0.25)
    thr = torch.tensor([0.5, 0.5])
    at3 = 0.5 + 3 + 7 * 0.25
    at6 = 1.0 + 6 + 4 * 0.25
    full = 1.0 + 10 + 2.0
    assert expected_time(scores, thr, [0, 1], costs) == pytest.approx((at3 + at6 + 2 * full) / 4)
    # Dropping layer 3: no check there, token 0 then exits at 6 (its score 0 fails there: full depth).
    assert expected_time(scores, thr, [1], costs) == pytest.approx((3 * (0.5 + 10 + 2.0) + (0.5 + 6 + 1.0)) / 4)


def test_finds_the_known_optimum():
    # As test_adapters' optimum: layer 3 is right exactly when its score > 0.6, layer 6 always right.
    t = 1000
    s1 = torch.linspace(0, 1, t)
    scores = _scores([s1, torch.full((t,), 0.5)], [s1 > 0.6, torch.ones(t, dtype=torch.bool)], [3, 6])
    policy = search_policy(scores, _costs([3, 6], 10, check=0.1), 1.0, quantiles=201)
    agreement, mean_layers, counts = simulate(scores, policy.thresholds)
    assert policy.kept == [0, 1] and agreement == 1.0
    assert mean_layers == pytest.approx(4.8, abs=0.05) and counts.tolist()[0] == pytest.approx(400, abs=6)


def test_a_layer_that_cannot_tell_right_from_wrong_is_dropped():
    # Layer 3: random scores, right half the time; layer 6: right exactly when its score > 0.3 (70%).
    g = torch.Generator().manual_seed(0)
    t = 4000
    s3, s6 = torch.rand(t, generator=g), torch.rand(t, generator=g)
    scores = _scores([s3, s6], [torch.rand(t, generator=g) < 0.5, s6 > 0.3], [3, 6])
    costs = _costs([3, 6], 10, check=0.5)
    policy = search_policy(scores, costs, 0.99)
    assert policy.kept == [1] and torch.isinf(policy.thresholds[0]) and torch.isfinite(policy.thresholds[1])
    agreement, _, counts = simulate(scores, policy.thresholds)
    assert agreement >= 0.99 and counts[1] > 0.6 * t
    assert policy.time_s == pytest.approx(expected_time(scores, policy.thresholds, [1], costs))
    assert policy.time_s < policy.full_depth_s == pytest.approx(10 + 2.0)


def test_nothing_pays_then_early_exit_is_off():
    # Exits at layer 8 of 10 that save 2 layers and the head but each check costs 5 layers.
    t = 1000
    s = torch.linspace(0, 1, t)
    scores = _scores([s], [s > 0.5], [8])
    policy = search_policy(scores, _costs([8], 10, check=5.0), 0.9)
    assert policy.kept == [] and torch.isinf(policy.thresholds).all()
    assert policy.time_s == policy.full_depth_s


def test_meets_its_target_on_held_out_draws():
    # Calibrated confidences: a token is right with probability equal to its score; fresh draws are "held out".
    def draw(seed, t=8000):
        g = torch.Generator().manual_seed(seed)
        s = [torch.rand(t, generator=g) ** 0.3 for _ in range(2)]
        return _scores(s, [torch.rand(t, generator=g) < x for x in s], [3, 6])

    target = 0.95
    policy = time_policy(draw(1), _costs([3, 6], 10, check=0.5), target, quantiles=64)
    assert policy.kept and policy.margin >= 0 and policy.target == pytest.approx(target + policy.margin)
    held = [simulate(draw(seed), policy.thresholds)[0] for seed in (2, 3)]
    # Sampling noise of one draw's agreement is about 0.25 points.
    assert min(held) >= target - 0.006, (held, policy)


def test_calibrate_by_time_end_to_end(model):
    eem = EarlyExitLM(model, EXITS)
    costs = _costs(EXITS, 6, check=0.2, head=1.0, propagate=0.1)
    data, held = random_ids(1024, 6), random_ids(1024, 8)
    thresholds, report = calibrate(eem, data, target_agreement=0.9, costs=costs, seq_len=32, progress=False)
    assert report.objective == "time" and eem.thresholds == thresholds and len(thresholds) == len(eem.exit_layers)
    assert list(report.exit_fraction) == eem.exit_layers and set(report.dropped_layers) | set(eem.exit_layers) == set(
        EXITS
    )
    assert report.agreement >= 0.9 and report.time_per_token_s <= report.full_depth_time_s
    assert "ms/token" in str(report)
    assert eem.exit_layers, "cheap checks on a peaked random model pay"
    # Held out: the same kind of text (random ids), so the agreement carries over up to sampling noise.
    scores = exit_scores(eem, held, seq_len=32, progress=False)
    agreement, _, _ = simulate(scores, torch.tensor(thresholds))
    assert agreement >= 0.9 - 0.03


def test_calibrate_turns_early_exit_off_when_nothing_pays(model):
    eem = EarlyExitLM(model, EXITS)
    _, report = calibrate(
        eem, random_ids(512, 6), target_agreement=0.9, costs=_costs(EXITS, 6, check=50.0), seq_len=32, progress=False
    )
    assert eem.exit_layers == [] and eem.thresholds == [] and eem.heads == []
    assert report.exit_fraction == {} and report.dropped_layers == EXITS and "OFF" in str(report)
    # Off: every token runs at full depth, with no exit check, giving model.generate's tokens.
    ids = random_ids(5, 1)[None]
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    for mode in ("exit", "exact"):
        out = eem.generate(ids, max_new_tokens=6, mode=mode)
        assert torch.equal(out.sequences, ref) and (out.exit_layer == 6).all(), mode
        assert out.stats["exit_check_time_share"] == 0.0


def test_objective_layers_is_the_old_search(model):
    eem = EarlyExitLM(model, EXITS)
    data = random_ids(1024, 6)
    thresholds, report = calibrate(eem, data, target_agreement=0.9, objective="layers", seq_len=32, progress=False)
    scores = exit_scores(eem, data, seq_len=32, progress=False)
    old = report_for(scores, choose_thresholds(scores, 0.9), 0.9)
    assert eem.exit_layers == EXITS and thresholds == old.thresholds and report == old
    assert report.time_per_token_s is None and report.objective == "layers"


def test_set_exit_layers_keeps_heads(model):
    heads = {2: torch.nn.Identity(), 4: torch.nn.Identity()}
    eem = EarlyExitLM(model, EXITS, heads=heads)
    eem.set_exit_layers([4], [0.7])
    assert eem.exit_layers == [4] and eem.thresholds == [0.7] and eem.heads == [heads[4]]
    eem.set_exit_layers([3, 4], 0.5)
    assert eem.heads == [None, heads[4]] and eem.thresholds == [0.5, 0.5]
    with pytest.raises(ValueError, match="exit_layers"):
        eem.set_exit_layers([4, 3], 0.5)
    with pytest.raises(ValueError, match="threshold"):
        eem.set_exit_layers([3], [0.5, 0.6])


def test_bad_arguments(model):
    eem = EarlyExitLM(model, EXITS)
    with pytest.raises(ValueError, match="objective"):
        calibrate(eem, random_ids(64, 5), objective="speed")
    with pytest.raises(ValueError, match="costs"):
        calibrate(eem, random_ids(64, 5), costs="fast")
    with pytest.raises(ValueError, match="costs"):
        calibrate(eem, random_ids(64, 5), costs=_costs([2, 4], 12))
    with pytest.raises(ValueError, match="costs"):
        calibrate(eem, random_ids(64, 5), costs=_costs([2], 6))
