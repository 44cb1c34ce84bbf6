"""Sampling as model.generate samples: transformers' own warpers are the oracle, the generation config the defaults."""

import itertools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_generate import _reference  # noqa: E402
from tiny_models import left_padded_batch, tiny_causal_lm  # noqa: E402
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from earlyexit import EarlyExitLM  # noqa: E402
from earlyexit.hf.sampling import TokenChooser  # noqa: E402

EXITS = [2, 4]


def _warped_probs(logits, temperature, top_k, top_p, min_p):
    """model.generate's sampling distribution: its warpers in its order (generation/utils.py), then softmax."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    return warpers(None, logits.clone()).softmax(-1)


def _logits():
    """[6, 300] float32 logits: random, a row of many ties, a peaked row, a row with -inf entries."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 300, generator=g) * 3
    z[1] = torch.randint(0, 4, (300,), generator=g).float()  # four distinct values, many ties at the k-th
    z[2, 17] += 40.0
    z[3, ::3] = float("-inf")
    return z


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    list(itertools.product([1.0, 0.7], [0, 1, 7, 300, 1000], [1.0, 0.9, 0.3], [0.0, 0.05, 0.5])),
)
def test_probs_are_transformers_warpers(temperature, top_k, top_p, min_p):
    z = _logits()
    ours = TokenChooser(True, temperature, top_p, top_k, min_p).probs(z)
    assert torch.equal(ours, _warped_probs(z, temperature, top_k, top_p, min_p))
    # Any leading shape: the verification samples [K, n + 1, V] at once.
    assert torch.equal(
        TokenChooser(True, temperature, top_p, top_k, min_p).probs(z.view(2, 3, 300)), ours.view(2, 3, 300)
    )


def test_filters_default_to_the_generation_config():
    model = tiny_causal_lm("llama", num_layers=6)
    ids, am = left_padded_batch()
    greedy = _reference(model, ids, am, 8)
    eem = EarlyExitLM(model, EXITS, threshold=2.0)  # exit mode: nothing exits
    model.generation_config.top_k = 1  # sampling keeps the most likely token only: greedy
    model.generation_config.temperature = 5.0
    for mode in ("exit", "exact"):
        torch.manual_seed(0)
        out = eem.generate(ids, am, max_new_tokens=8, mode=mode, do_sample=True, eos_token_id=[])
        assert torch.equal(out.sequences, greedy), mode
    torch.manual_seed(0)
    hot = eem.generate(ids, am, max_new_tokens=8, do_sample=True, top_k=0, eos_token_id=[])  # the call's value wins
    assert not torch.equal(hot.sequences, greedy)


def test_bad_filters_name_the_argument():
    model = tiny_causal_lm("llama", num_layers=6)
    ids, am = left_padded_batch()
    eem = EarlyExitLM(model, EXITS)
    bad = {
        "temperature": [0.0, -1.0, float("nan"), float("inf"), "1"],
        "top_p": [0.0, 1.5, float("nan")],
        "top_k": [-1, 1.5, True],
        "min_p": [-0.1, 1.1],
    }
    for name, values in bad.items():
        for value in values:
            with pytest.raises(ValueError, match=f"^{name}: expected"):
                eem.generate(ids, am, max_new_tokens=2, do_sample=True, **{name: value})
    model.generation_config.top_p = 0.0
    with pytest.raises(ValueError, match=r"^generation_config\.top_p: expected a value in \(0, 1\], got 0.0"):
        eem.generate(ids, am, max_new_tokens=2, do_sample=True)
    eem.generate(ids, am, max_new_tokens=2, do_sample=True, top_p=0.5)  # the call's value replaces the config's
    eem.generate(ids, am, max_new_tokens=2)  # greedy decoding reads no filter


def test_unset_top_k_is_model_generates_default():
    # transformers 5.x's generate fills the fields a generation config leaves unset (None) from
    # GenerationConfig._get_default_generation_params(), top_k 50 among them (earlier versions store
    # that 50 in the config itself): an unset top_k is 50, not off. At temperature 50 the tiny model's
    # distribution over its 300 tokens is nearly flat, so sampling from the whole vocabulary would
    # put most of 400 draws outside the 50 most likely tokens; with top_k 50 none may fall there.
    model = tiny_causal_lm("llama", num_layers=6)
    model.generation_config.top_k = None
    ids, am = left_padded_batch((4,))
    with torch.no_grad():
        top50 = model(ids).logits[0, -1].topk(50).indices
    many, many_am = ids.repeat(400, 1), am.repeat(400, 1)
    eem = EarlyExitLM(model, EXITS, threshold=2.0)
    for mode in ("exit", "exact"):
        torch.manual_seed(0)
        out = eem.generate(many, many_am, max_new_tokens=1, mode=mode, do_sample=True, temperature=50.0)
        assert not torch.isin(out.sequences[:, -1], top50, invert=True).any(), mode
    torch.manual_seed(0)
    off = eem.generate(many, many_am, max_new_tokens=1, do_sample=True, temperature=50.0, top_k=0)
    assert torch.isin(off.sequences[:, -1], top50, invert=True).sum() > 200  # top_k=0 given: off
    with torch.no_grad():  # model.generate itself keeps the 50 as well
        torch.manual_seed(0)
        ref = model.generate(many, attention_mask=many_am, max_new_tokens=1, do_sample=True, temperature=50.0)
    assert not torch.isin(ref[:, -1], top50, invert=True).any()
