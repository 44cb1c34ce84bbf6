"""EarlyExitLM's argument checks: end-of-sequence ids, token ids outside the vocabulary, NaN/infinite thresholds,
do_sample, the settable attributes, DraftPolicy's fields and generation-config settings EarlyExitLM does not apply."""

import copy
import math
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import left_padded_batch, tiny_causal_lm  # noqa: E402

from earlyexit import EarlyExitLM  # noqa: E402
from earlyexit.hf import DraftPolicy  # noqa: E402

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


@pytest.mark.parametrize("do_sample", ["False", "yes", 1, 0, None, np.bool_(False)])
def test_do_sample_must_be_a_bool(eem, do_sample):
    # A string is truthy: do_sample="False" used to sample.
    ids, am = left_padded_batch((3,))
    with pytest.raises(ValueError, match=r"^do_sample: expected True or False, got "):
        eem.generate(ids, am, max_new_tokens=2, do_sample=do_sample)


BAD_ATTRIBUTES = [
    ("draft_tokens", 2.7),
    ("draft_tokens", -5),
    ("draft_tokens", "4"),
    ("draft_tokens", None),
    ("draft_tokens", True),
    ("compaction", "no"),
    ("compaction", 0),
    ("draft_memory", 1),
    ("progress", 5),
    ("draft", "Auto"),
]


@pytest.mark.parametrize("name,value", BAD_ATTRIBUTES)
@pytest.mark.parametrize("mode", ["exit", "exact"])
def test_bad_attributes_name_themselves(eem, name, value, mode):
    ids, am = left_padded_batch((3,))
    setattr(eem, name, value)
    with pytest.raises(ValueError, match=rf"^{name}: expected "):
        eem.generate(ids, am, max_new_tokens=2, mode=mode)


def test_integer_attributes_take_any_integer_type(eem):
    ids, am = left_padded_batch((5, 3))
    ref = eem.generate(ids, am, max_new_tokens=4, mode="exact").sequences
    eem.draft_tokens = np.int64(2)
    assert torch.equal(eem.generate(ids, am, max_new_tokens=4, mode="exact").sequences, ref)
    eem.draft_tokens = 0  # never draft
    assert torch.equal(eem.generate(ids, am, max_new_tokens=4, mode="exact").sequences, ref)
    eem.draft = DraftPolicy(np.int64(1), np.float32(0.25), np.int64(3))
    assert (eem.draft.depth, eem.draft.threshold, eem.draft.max_tokens) == (1, 0.25, 3)
    assert type(eem.draft.depth) is int and type(eem.draft.threshold) is float and type(eem.draft.max_tokens) is int
    assert torch.equal(eem.generate(ids, am, max_new_tokens=4, mode="exact").sequences, ref)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"depth": True}, "depth"),
        ({"depth": 2.0}, "depth"),
        ({"depth": "2"}, "depth"),
        ({"depth": 0}, "depth"),
        ({"depth": -1}, "depth"),
        ({"depth": 2, "threshold": math.nan}, "threshold"),
        ({"depth": 2, "threshold": "x"}, "threshold"),
        ({"depth": 2, "threshold": True}, "threshold"),
        ({"depth": 2, "threshold": None}, "threshold"),
        ({"depth": 2, "max_tokens": True}, "max_tokens"),
        ({"depth": 2, "max_tokens": 2.5}, "max_tokens"),
        ({"depth": 2, "max_tokens": 0}, "max_tokens"),
        ({"depth": None, "max_tokens": -1}, "max_tokens"),
        ({"depth": None, "max_tokens": "4"}, "max_tokens"),
    ],
)
def test_draft_policy_fields_are_checked_when_made(kwargs, field):
    with pytest.raises(ValueError, match=rf"^DraftPolicy\.{field}: expected"):
        DraftPolicy(**kwargs)


def test_draft_policy_values_that_are_fine():
    assert DraftPolicy(None, max_tokens=0).max_tokens == 0  # no drafts: max_tokens is not read
    assert DraftPolicy(2, -math.inf).threshold == -math.inf  # measure="state": never stops early
    assert DraftPolicy(2, math.inf).threshold == math.inf  # always stops at the first draft
    assert DraftPolicy(2, 1).threshold == 1.0 and type(DraftPolicy(2, 1).threshold) is float


@pytest.fixture
def config(model, monkeypatch):
    """A copy of the model's generation config (eos 5), put back after the test."""
    monkeypatch.setattr(model, "generation_config", copy.deepcopy(model.generation_config))
    model.generation_config.eos_token_id = 5
    return model.generation_config


#: Generation-config settings that model.generate applies (logits processors, stopping criteria, other
#: searches) and EarlyExitLM does not: (field, a value, its default, which the message names). The
#: prompts are 5 tokens wide, so a min_length of 9 holds back the end of sequence (token 5).
NOT_APPLIED = [
    ("repetition_penalty", 1.5, 1.0),
    ("encoder_repetition_penalty", 1.2, 1.0),
    ("no_repeat_ngram_size", 2, 0),
    ("encoder_no_repeat_ngram_size", 2, 0),
    ("suppress_tokens", [5], None),
    ("begin_suppress_tokens", [5], None),
    ("bad_words_ids", [[5]], None),
    ("sequence_bias", {(5,): -10.0}, None),
    ("min_new_tokens", 2, None),
    ("min_length", 9, 0),
    ("forced_eos_token_id", 5, None),
    ("exponential_decay_length_penalty", (2, 1.5), None),
    ("remove_invalid_values", True, False),
    ("guidance_scale", 1.5, None),
    ("max_time", 10.0, None),
    ("stop_strings", ["x"], None),
    ("num_beams", 2, 1),
    ("num_return_sequences", 2, 1),
]


@pytest.mark.parametrize("field,value,default", NOT_APPLIED, ids=[f for f, _, _ in NOT_APPLIED])
@pytest.mark.parametrize("mode", ["exit", "exact"])
def test_generation_config_settings_that_are_not_applied(eem, config, field, value, default, mode):
    ids, am = left_padded_batch((5, 3))
    setattr(config, field, value)
    message = (
        rf"^generation_config\.{field}: model\.generate applies .*, EarlyExitLM does not; "
        rf"set model\.generation_config\.{field} = {re.escape(repr(default))} \(its default\) to turn it off$"
    )
    with pytest.raises(ValueError, match=message):
        eem.generate(ids, am, max_new_tokens=3, mode=mode)
    setattr(config, field, default)
    eem.generate(ids, am, max_new_tokens=3, mode=mode)  # the default turns it off


def test_the_defaults_named_are_transformers_own():
    # The inactive value each message suggests is the one model.generate fills an unset field with.
    from earlyexit.hf.early_exit_lm import _NOT_APPLIED, _NOT_APPLIED_SAMPLING

    config = transformers.GenerationConfig()
    defaults = getattr(config, "_get_default_generation_params", dict)()
    for name, (off, _) in {**_NOT_APPLIED, **_NOT_APPLIED_SAMPLING}.items():
        assert hasattr(config, name), name  # a field of this transformers version
        assert defaults.get(name, getattr(config, name)) == off, name


#: The same for the warpers model.generate adds only when sampling.
SAMPLING_ONLY = [("typical_p", 0.5, 1.0), ("epsilon_cutoff", 0.1, 0.0), ("eta_cutoff", 0.1, 0.0), ("top_h", 0.5, None)]


@pytest.mark.parametrize("field,value,default", SAMPLING_ONLY, ids=[f for f, _, _ in SAMPLING_ONLY])
def test_sampling_warpers_that_are_not_applied(eem, model, config, field, value, default):
    ids, am = left_padded_batch((5, 3))
    setattr(config, field, value)
    with pytest.raises(ValueError, match=rf"^generation_config\.{field}: .* = {re.escape(repr(default))} \(its"):
        eem.generate(ids, am, max_new_tokens=3, do_sample=True)
    # Greedy decoding: model.generate adds no warper either, so the setting changes nothing.
    out = eem.generate(ids, am, max_new_tokens=6, mode="exact")
    with torch.no_grad():
        assert torch.equal(out.sequences, model.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False))
    setattr(config, field, default)
    eem.generate(ids, am, max_new_tokens=3, do_sample=True)


def test_generation_config_settings_that_change_nothing(eem, model, config):
    """Settings model.generate reads but that change nothing in these calls are accepted, and the output
    is still model.generate's with them: inactive values, max_length (max_new_tokens takes precedence),
    a min_length within the prompt's width (it counts the prompt), a forced BOS (only for a one-token
    input), a log-softmax of the logits."""
    ids, am = left_padded_batch((5, 3))
    inert = dict(
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        suppress_tokens=[],
        bad_words_ids=None,
        min_new_tokens=None,
        min_length=ids.shape[1],
        max_length=3,
        forced_bos_token_id=7,
        renormalize_logits=True,
        num_beams=1,
        typical_p=0.5,  # greedy: no warper
        guidance_scale=1.0,
        remove_invalid_values=False,
    )
    for field, value in inert.items():
        setattr(config, field, value)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False)
    for mode in ("exit", "exact"):
        assert torch.equal(eem.generate(ids, am, max_new_tokens=8, mode=mode).sequences[:, : ref.shape[1]], ref)
    # The call decides those that depend on it: a one-token prompt gets the forced BOS, a min_length
    # past the prompt's width holds back the end of sequence, and without an end of sequence neither
    # min_length nor min_new_tokens changes anything.
    one = left_padded_batch((1,))
    config.min_length = 0  # else it holds back the end of sequence of that prompt
    with pytest.raises(ValueError, match=r"^generation_config\.forced_bos_token_id: "):
        eem.generate(*one, max_new_tokens=2)
    config.forced_bos_token_id = None
    config.min_length = ids.shape[1] + 1
    with pytest.raises(ValueError, match=r"^generation_config\.min_length: "):
        eem.generate(ids, am, max_new_tokens=2)
    config.min_new_tokens = 0  # model.generate then counts min_length from the prompt: T + 0
    eem.generate(ids, am, max_new_tokens=2)
    config.min_new_tokens = 3
    with pytest.raises(ValueError, match=r"^generation_config\.min_new_tokens: "):
        eem.generate(ids, am, max_new_tokens=2)
    eem.generate(ids, am, max_new_tokens=2, eos_token_id=[])
    config.min_new_tokens, config.eos_token_id = None, None
    eem.generate(ids, am, max_new_tokens=2)
