"""Exit adapters: a small affine map per exit layer, trained to make the shared exit head read well.

An ordinary model's intermediate hidden states read poorly through its final norm + lm_head. An
adapter ``h -> h @ A.T + b`` (d x d plus bias, initialised to the identity) sits in front of that
shared head at one exit layer and is trained by KL divergence to the full model's next-token
distribution (the teacher), with the model frozen. At inference it is one small GEMM before the
fused exit check, so the exit stays one kernel.
"""

import json
import os
from collections.abc import Mapping

import torch

from earlyexit.ops.reference import head_logits
from earlyexit.tuning.progress import progress_bar
from earlyexit.tuning.teacher_forcing import collect_states
from earlyexit.tuning.text_data import token_windows

WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapters.json"
FORMAT_VERSION = 1


def _model_dims(model):
    config = model.config
    return int(config.hidden_size), int(config.vocab_size)


def _model_id(model):
    config = model.config
    return str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", ""))


class AffineAdapter(torch.nn.Linear):
    """``h -> h @ A.T + b`` computed in the adapter's dtype, returned in the input's dtype.

    Float32 adapters can then serve a bf16/fp16 model: hidden [N, d] in, same dtype out.
    """

    def forward(self, hidden):
        return super().forward(hidden.to(self.weight.dtype)).to(hidden.dtype)


class ExitAdapters(torch.nn.Module, Mapping):
    """Per-exit-layer affine adapters, usable as ``EarlyExitLM(..., heads=adapters)``.

    A mapping ``{exit_layer: nn.Linear(d, d)}``: each value maps hidden [N, d] -> [N, d] and runs
    before the shared final norm + lm_head. Identity-initialised, so untrained adapters reproduce
    the shared head exactly.

    Args:
        exit_layers: sorted layer counts k (adapter after the first k decoder layers).
        hidden_size: d. vocab_size: V of the head they were trained for (checked on use).
        model_id: a free-form identifier of the model they were trained on (saved in the config).
    """

    def __init__(self, exit_layers, hidden_size, vocab_size, model_id=""):
        torch.nn.Module.__init__(self)
        layers = [int(k) for k in exit_layers]
        if not layers or layers != sorted(set(layers)):
            raise ValueError(f"exit_layers: expected sorted distinct layer numbers, got {list(exit_layers)}")
        self.exit_layers = tuple(layers)
        self.hidden_size = int(hidden_size)
        self.vocab_size = int(vocab_size)
        self.model_id = str(model_id)
        self.maps = torch.nn.ModuleList(AffineAdapter(hidden_size, hidden_size) for _ in layers)
        with torch.no_grad():
            for m in self.maps:
                m.weight.copy_(torch.eye(hidden_size))
                m.bias.zero_()

    # Mapping protocol: {exit layer: adapter module}.
    def __getitem__(self, layer):
        try:
            return self.maps[self.exit_layers.index(layer)]
        except ValueError:
            raise KeyError(layer) from None

    def __iter__(self):
        return iter(self.exit_layers)

    def __len__(self):
        return len(self.exit_layers)

    def __hash__(self):  # Mapping sets __hash__ = None; a Module must stay hashable
        return id(self)

    def __eq__(self, other):
        return self is other

    def check_model(self, model):
        """Raise ValueError unless ``model`` has this width and vocabulary (the message names both)."""
        d, v = _model_dims(model)
        if d != self.hidden_size:
            raise ValueError(f"adapters: hidden size {self.hidden_size} does not match the model's hidden size {d}")
        if v != self.vocab_size:
            raise ValueError(f"adapters: vocabulary size {self.vocab_size} does not match the model's {v}")

    def save(self, folder):
        """Write ``adapters.safetensors`` (weights) and ``adapters.json`` (layers, d, V, model id) to ``folder``."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        tensors = {
            f"layer{k}.{name}": p.detach().contiguous().cpu()
            for k, m in self.items()
            for name, p in m.named_parameters()
        }
        save_file(tensors, os.path.join(folder, WEIGHTS_FILE))
        config = dict(
            format_version=FORMAT_VERSION,
            exit_layers=list(self.exit_layers),
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
            model_id=self.model_id,
            dtype=str(self.maps[0].weight.dtype).replace("torch.", ""),
        )
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)

    @classmethod
    def load(cls, folder, model=None):
        """Read adapters saved by :meth:`save`; with ``model``, check its width and vocabulary first.

        Raises:
            ValueError: missing or malformed files, or a model of another width or vocabulary.
        """
        from safetensors.torch import load_file

        cfg_path, w_path = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
        if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
            raise ValueError(f"folder: {folder!r} holds no saved adapters ({CONFIG_FILE} and {WEIGHTS_FILE} expected)")
        with open(cfg_path) as f:
            try:
                cfg = json.load(f)
                layers, d, v = cfg["exit_layers"], cfg["hidden_size"], cfg["vocab_size"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"folder: {cfg_path} is not an adapters config ({e})") from None
        adapters = cls(layers, d, v, cfg.get("model_id", ""))
        if model is not None:
            adapters.check_model(model)
        tensors = load_file(w_path)
        expected = {f"layer{k}.{n}" for k in layers for n in ("weight", "bias")}
        if set(tensors) != expected:
            raise ValueError(f"folder: {w_path} holds {sorted(tensors)}, expected {sorted(expected)}")
        dtype = getattr(torch, cfg.get("dtype", "float32"))
        adapters.to(dtype)
        with torch.no_grad():
            for k, m in adapters.items():
                for name, p in m.named_parameters():
                    t = tensors[f"layer{k}.{name}"]
                    if t.shape != p.shape:
                        raise ValueError(
                            f"folder: {name} of layer {k} has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
                        )
                    p.copy_(t)
        return adapters


def _kl_to_teacher(student_logits, teacher_logp):
    """Mean over rows of KL(teacher || student), both over the full vocabulary; float32."""
    logq = torch.log_softmax(student_logits.float(), -1)
    return (teacher_logp.exp() * (teacher_logp - logq)).sum(-1).mean()


def _logit_args(head):
    """The softcap / temperature keywords of :func:`head_logits` for an exit head dict (softcap only when set)."""
    args = {"temperature": head.get("temperature", 1.0)}
    if head.get("softcap") is not None:
        args["softcap"] = head["softcap"]
    return args


def _exit_logits(hidden, adapter, head):
    """Float32 logits [N, V] of the shared head after ``adapter``: final norm (with its offset), lm_head,
    softcap and temperature, as the exit check defines them (differentiable in the adapter)."""
    return head_logits(
        adapter(hidden),
        head["weight"],
        norm_weight=head["norm_weight"],
        norm_eps=head["norm_eps"],
        norm_offset=head.get("norm_offset", 0.0),
        bias=head["bias"],
        **_logit_args(head),
    )


def _exit_head_fp32(model):
    from earlyexit.hf.model_adapter import exit_head_args

    # Detached: the model stays frozen, and no gradient is ever computed for its head.
    head = {k: (t.detach() if isinstance(t, torch.Tensor) else t) for k, t in exit_head_args(model).items()}
    head["norm_weight"] = head["norm_weight"].float()
    return head


@torch.no_grad()
def adapter_kl(adapters, model, states, final, *, chunk=1024):
    """Mean KL(teacher || exit) per exit layer over cached states (see :func:`collect_states`). Returns {k: float}."""
    head = _exit_head_fp32(model)
    totals = {k: 0.0 for k in adapters}
    n = final.shape[0]
    for i in range(0, n, chunk):
        t_logp = torch.log_softmax(_teacher_logits(final[i : i + chunk], head), -1)
        for k, a in adapters.items():
            totals[k] += _kl_to_teacher(_exit_logits(states[k][i : i + chunk], a, head), t_logp).item() * len(t_logp)
    return {k: v / n for k, v in totals.items()}


def _teacher_logits(final_hidden, head):
    """The full model's float32 logits [N, V] from its lm_head input (after the final norm): lm_head,
    softcap and temperature (logits_scaling), as the model computes them."""
    return head_logits(final_hidden, head["weight"], bias=head["bias"], **_logit_args(head))


def train_exit_adapters(
    model,
    exit_layers,
    data,
    *,
    tokenizer=None,
    steps=300,
    lr=1e-3,
    batch_size=256,
    seq_len=128,
    max_tokens=16384,
    device=None,
    seed=0,
    progress=True,
):
    """Train one identity-initialised affine adapter per exit layer by KL to the full model.

    The model is frozen. Its teacher-forced hidden states at the exit layers and its final hidden
    state are computed once over ``data`` (at most ``max_tokens`` tokens, in ``seq_len`` windows);
    each step then draws ``batch_size`` token positions at random and minimises the sum over exit
    layers of KL(full model || shared head after the adapter) over the whole vocabulary, with AdamW.

    Args:
        model: a transformers causal LM of a supported family (:data:`earlyexit.hf.model_adapter.SUPPORTED`).
        exit_layers: sorted layer counts k, 1 <= k < L.
        data: list of strings (needs ``tokenizer``) or a LongTensor of token ids.
        steps, lr, batch_size (token positions per step), seq_len, max_tokens: training settings.
        device: where to train (default: the model's device).
    Returns:
        :class:`ExitAdapters` (float32, on ``device``) with ``history``: the loss per step.
    Raises:
        ValueError: empty data, missing tokenizer, bad exit layers.
    """
    num_layers = int(model.config.num_hidden_layers)
    layers = [int(k) for k in exit_layers]
    if not layers or layers != sorted(set(layers)) or layers[0] < 1 or layers[-1] >= num_layers:
        raise ValueError(
            f"exit_layers: expected sorted distinct values in [1, {num_layers - 1}], got {list(exit_layers)}"
        )
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    windows = token_windows(data, seq_len, tokenizer=tokenizer, max_tokens=max_tokens)
    states, final = collect_states(model, layers, windows, device=device, progress=progress)
    d, v = _model_dims(model)
    adapters = ExitAdapters(layers, d, v, _model_id(model)).to(device)
    head = {k: (t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in _exit_head_fp32(model).items()}
    opt = torch.optim.AdamW(adapters.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = progress_bar(total=steps, desc="training exit adapters", unit="step", enabled=progress)
    for _ in range(steps):
        rows = torch.randint(0, final.shape[0], (batch_size,), generator=gen)
        with torch.no_grad():
            t_logp = torch.log_softmax(_teacher_logits(final[rows].to(device), head), -1)
        loss = sum(_kl_to_teacher(_exit_logits(states[k][rows].to(device), adapters[k], head), t_logp) for k in layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item() / len(layers))
        bar.set_postfix(kl=f"{history[-1]:.3f}")
        bar.update()
    bar.close()
    adapters.history = history
    return adapters.requires_grad_(False)
