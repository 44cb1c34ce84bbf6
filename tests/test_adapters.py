"""Exit adapters and threshold calibration on a small random-weight Llama (CPU, seconds)."""

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tiny_models import random_ids, tiny_causal_lm  # noqa: E402

import earlyexit  # noqa: E402
from earlyexit import EarlyExitLM, ExitAdapters, calibrate, train_exit_adapters  # noqa: E402
from earlyexit.tuning.adapters import adapter_kl  # noqa: E402
from earlyexit.tuning.calibrate import ExitScores, choose_thresholds, exit_scores, simulate  # noqa: E402
from earlyexit.tuning.teacher_forcing import collect_states  # noqa: E402
from earlyexit.tuning.text_data import token_windows  # noqa: E402

EXITS = [2, 4]


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama", num_layers=6)


def test_identity_adapters_reproduce_the_shared_head(model):
    ident = ExitAdapters(EXITS, 64, 300)
    a = exit_scores(EarlyExitLM(model, EXITS), random_ids(256, 1), seq_len=32, progress=False)
    b = exit_scores(EarlyExitLM(model, EXITS, heads=ident), random_ids(256, 1), seq_len=32, progress=False)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.correct, b.correct)


def test_training_lowers_held_out_kl(model):
    adapters = train_exit_adapters(
        model, EXITS, random_ids(2048, 2), steps=40, lr=3e-3, batch_size=128, seq_len=32, progress=False
    )
    assert isinstance(adapters, ExitAdapters) and len(adapters.history) == 40
    states, final = collect_states(model, EXITS, token_windows(random_ids(512, 3), 32))
    before = adapter_kl(ExitAdapters(EXITS, 64, 300), model, states, final)
    after = adapter_kl(adapters, model, states, final)
    for k in EXITS:
        assert after[k] < 0.9 * before[k], (k, before[k], after[k])


def test_save_load_round_trips_bit_exactly(model, tmp_path):
    adapters = ExitAdapters(EXITS, 64, 300, model_id="tiny")
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn_like(p))
    adapters.save(tmp_path)
    loaded = ExitAdapters.load(tmp_path, model=model)
    assert loaded.exit_layers == tuple(EXITS) and loaded.model_id == "tiny"
    for (n1, p1), (n2, p2) in zip(adapters.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.randn(5, 64)
    assert torch.equal(adapters[2](x), loaded[2](x))


def test_adapters_plug_into_early_exit_lm(model):
    adapters = ExitAdapters(EXITS, 64, 300)
    eem = EarlyExitLM(model, EXITS, threshold=2.0, heads=adapters)  # unreachable: full depth
    ids = random_ids(12, 4).reshape(2, 6)
    out = eem.generate(ids, max_new_tokens=3)
    ref = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(out.sequences, ref)


def test_load_errors_name_the_problem(model, tmp_path):
    with pytest.raises(ValueError, match="folder"):
        ExitAdapters.load(tmp_path / "missing")
    ExitAdapters(EXITS, 32, 300).save(tmp_path / "narrow")
    with pytest.raises(ValueError, match="32.*64"):
        ExitAdapters.load(tmp_path / "narrow", model=model)
    ExitAdapters(EXITS, 64, 999).save(tmp_path / "vocab")
    with pytest.raises(ValueError, match="999.*300"):
        ExitAdapters.load(tmp_path / "vocab", model=model)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapters.json").write_text("{not json")
    (tmp_path / "bad" / "adapters.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="folder"):
        ExitAdapters.load(tmp_path / "bad")


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="data"):
        train_exit_adapters(model, EXITS, [], steps=1)
    with pytest.raises(ValueError, match="tokenizer"):
        train_exit_adapters(model, EXITS, ["some text"], steps=1)
    with pytest.raises(ValueError, match="exit_layers"):
        train_exit_adapters(model, [4, 2], random_ids(64, 5), steps=1)
    with pytest.raises(ValueError, match="exit_layers"):
        ExitAdapters([], 64, 300)
    with pytest.raises(ValueError, match="target_agreement"):
        calibrate(EarlyExitLM(model, EXITS), random_ids(64, 5), target_agreement=1.5)
    with pytest.raises(ValueError, match="data"):
        calibrate(EarlyExitLM(model, EXITS), torch.empty(0, dtype=torch.int64))


def test_choose_thresholds_finds_the_known_optimum():
    # Layer 1 (of 2, L=10) is right exactly when its score > 0.6; layer 2 always right.
    t = 1000
    s1 = torch.linspace(0, 1, t)
    scores = ExitScores(
        scores=torch.stack([s1, torch.full((t,), 0.5)]),
        correct=torch.stack([s1 > 0.6, torch.ones(t, dtype=torch.bool)]),
        exit_layers=[3, 6],
        num_layers=10,
        measure="max_prob",
    )
    thr = choose_thresholds(scores, 1.0, quantiles=201)
    agreement, mean_layers, counts = simulate(scores, thr)
    assert agreement == 1.0
    # Optimum: tokens above 0.6 exit at 3, all others at 6: 0.4 * 3 + 0.6 * 6 = 4.8 layers.
    assert mean_layers == pytest.approx(4.8, abs=0.05)
    assert counts.tolist()[0] == pytest.approx(400, abs=6)


@pytest.mark.parametrize("measure", ["max_prob", "margin", "entropy"])
def test_calibrate_meets_its_target_on_its_own_data(model, measure):
    eem = EarlyExitLM(model, EXITS, measure=measure)
    data = random_ids(1024, 6)
    thresholds, report = calibrate(eem, data, target_agreement=0.9, objective="layers", seq_len=32, progress=False)
    assert eem.thresholds == thresholds and len(thresholds) == len(EXITS)
    assert report.agreement >= 0.9 and report.mean_layers < 6
    # The report is what the policy achieves: recompute it from the scores.
    scores = exit_scores(eem, data, seq_len=32, progress=False)
    to_score = [(-t if measure == "entropy" else t) for t in thresholds]
    agreement, mean_layers, _ = simulate(scores, torch.tensor(to_score))
    assert agreement == pytest.approx(report.agreement) and mean_layers == pytest.approx(report.mean_layers)
    assert all(isinstance(t, float) and not math.isnan(t) for t in thresholds)


def test_public_names():
    for name in ("ExitAdapters", "train_exit_adapters", "calibrate"):
        assert hasattr(earlyexit, name)


def test_calibrated_folder_round_trips(model, tmp_path):
    from earlyexit.apps.calibrate_cmd import load_heads, save_thresholds

    adapters = ExitAdapters(EXITS, 64, 300)
    eem = EarlyExitLM(model, EXITS, measure="margin", heads=adapters)
    _, report = calibrate(eem, random_ids(512, 7), target_agreement=0.8, objective="layers", seq_len=32, progress=False)
    adapters.save(tmp_path)
    save_thresholds(tmp_path, eem, report)
    loaded, policy = load_heads(tmp_path, model)
    assert loaded.exit_layers == tuple(EXITS)
    assert policy["thresholds"] == report.thresholds and policy["measure"] == "margin"
    assert policy["exit_layers"] == EXITS


def test_one_pass_scores_every_measure(model):
    from earlyexit.tuning.calibrate import exit_scores_by_measure, exit_scores_from_states

    states, final = collect_states(model, EXITS, token_windows(random_ids(256, 8), 32))
    together = exit_scores_by_measure(EarlyExitLM(model, EXITS), states, final)
    for measure in ("max_prob", "margin", "entropy"):
        alone = exit_scores_from_states(EarlyExitLM(model, EXITS, measure=measure), states, final)
        assert torch.equal(together[measure].scores, alone.scores)
        assert torch.equal(together[measure].correct, alone.correct) and together[measure].measure == measure


@pytest.mark.gpu
def test_train_and_calibrate_on_cuda():
    """Training and calibration with the model on a GPU: states, heads and the exit checks stay on the
    model's device; the adapters plug into a CUDA EarlyExitLM."""
    model = tiny_causal_lm("llama", num_layers=6).to("cuda")
    adapters = train_exit_adapters(
        model, EXITS, random_ids(1024, 2), steps=20, lr=3e-3, batch_size=128, seq_len=32, progress=False
    )
    assert next(adapters.parameters()).device.type == "cuda"
    eem = EarlyExitLM(model, EXITS, heads=adapters)
    thresholds, report = calibrate(
        eem, random_ids(512, 6), target_agreement=0.9, objective="layers", seq_len=32, progress=False
    )
    assert report.agreement >= 0.9 and len(thresholds) == len(EXITS)
    ids = random_ids(8, 7).view(2, 4).cuda()
    out = eem.generate(ids, torch.ones_like(ids), max_new_tokens=4)
    assert out.sequences.shape == (2, 8) and out.sequences.device.type == "cuda"
