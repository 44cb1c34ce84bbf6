"""EarlyExitLM's argument checks: end-of-sequence ids, token ids outside the vocabulary, NaN/infinite thresholds."""

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import left_padded_batch, tiny_causal_lm  # noqa: E402

from earlyexit import EarlyExitLM  # noqa: E402

V = 300  # the tiny model's vocabulary


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama", num_layers=4)


@pytest.fixture
def eem(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return EarlyExitLM(model, [1, 2], threshold=0.5)


@pytest.mark.parametrize("mode", ["exit", "exact"])
def test_empty_eos_list_means_no_end_of_sequence(eem, model, mode):
    ids, am = left_padded_batch((5, 3))
    free = eem.generate(ids, am, max_new_tokens=4, mode=mode).sequences  # no eos anywhere
    first = int(free[0, ids.shape[1]])
    model.generation_config.eos_token_id = first  # the config's eos ends row 0 at its first token ...
    stopped = eem.generate(ids, am, max_new_tokens=4, mode=mode).sequences
    assert stopped[0, ids.shape[1] + 1 :].eq(0).all()
    # ... but an explicit [] means no end of sequence, even over the generation config's
    assert torch.equal(eem.generate(ids, am, max_new_tokens=4, mode=mode, eos_token_id=[]).sequences, free)
    model.generation_config.pad_token_id = None  # no pad and no eos: pads with 0, no IndexError
    assert torch.equal(eem.generate(ids, am, max_new_tokens=4, mode=mode, eos_token_id=[]).sequences, free)
    # eos as an int, a list or a tensor
    for eos in (first, [first], (V - 1, first), torch.tensor([first])):
        out = eem.generate(ids, am, max_new_tokens=4, mode=mode, eos_token_id=eos).sequences
        assert torch.equal(out[0, : ids.shape[1] + 1], free[0, : ids.shape[1] + 1])


@pytest.mark.parametrize("eos", [V, -1, [2, V], [1.5], "2", True, [True], 2.0, object()])
def test_bad_eos_token_id(eem, eos):
    ids, am = left_padded_batch((3,))
    with pytest.raises(ValueError, match="eos_token_id"):
        eem.generate(ids, am, max_new_tokens=2, eos_token_id=eos)


def test_bad_eos_in_the_generation_config(eem, model):
    ids, am = left_padded_batch((3,))
    model.generation_config.eos_token_id = V + 5
    with pytest.raises(ValueError, match=r"generation_config\.eos_token_id.*\[0, 300\)"):
        eem.generate(ids, am, max_new_tokens=2)


@pytest.mark.parametrize("bad", [V, V + 100, -1])
@pytest.mark.parametrize("mode", ["exit", "exact"])
def test_input_ids_outside_the_vocabulary(eem, bad, mode):
    ids, am = left_padded_batch((4, 2))
    ids[1, -1] = bad
    with pytest.raises(ValueError, match=rf"input_ids: .*\[0, {V}\).*{bad}"):
        eem.generate(ids, am, max_new_tokens=2, mode=mode)
    ids[1, -1] = V - 1  # the largest id is fine
    eem.generate(ids, am, max_new_tokens=2, mode=mode)


def test_padding_outside_the_vocabulary_is_refused_too(eem):
    ids, am = left_padded_batch((4, 2))
    ids[1, 0] = -100  # a padded position: still embedded
    with pytest.raises(ValueError, match="input_ids"):
        eem.generate(ids, am, max_new_tokens=2)


@pytest.mark.parametrize(
    "threshold",
    [math.nan, [0.5, math.nan], torch.tensor([math.nan, 0.5]), -math.inf, [0.5, -math.inf], "0.5", [0.5, "x"]],
)
def test_nan_or_always_exiting_threshold(model, threshold):
    with pytest.raises(ValueError, match="threshold"):
        EarlyExitLM(model, [1, 2], threshold=threshold)
    eem = EarlyExitLM(model, [1, 2], threshold=0.5)
    with pytest.raises(ValueError, match="threshold"):
        eem.set_exit_layers([1, 2], threshold)
    assert eem.thresholds == [0.5, 0.5]  # unchanged


def test_entropy_infinities(model):
    with pytest.raises(ValueError, match="threshold"):
        EarlyExitLM(model, [1, 2], threshold=math.inf, measure="entropy")  # entropy <= inf: always exits
    eem = EarlyExitLM(model, [1, 2], threshold=-math.inf, measure="entropy")  # never exits
    with pytest.raises(ValueError, match="threshold"):
        eem.set_exit_layers([1], [math.nan])


def test_never_exiting_infinity_is_allowed(eem, model):
    """Calibration writes +inf (max_prob, margin) for an exit layer it does not use: that layer never exits."""
    model.generation_config.eos_token_id = None
    ids, am = left_padded_batch((5, 3))
    eem.set_exit_layers([1, 2], [math.inf, math.inf])
    out = eem.generate(ids, am, max_new_tokens=3)
    assert out.exit_layer.eq(eem.num_layers).all()
    eem.set_exit_layers([1, 2], torch.tensor([0.5, math.inf]))
    assert eem.thresholds == [0.5, math.inf]
