"""Teacher-forced hidden states of a HuggingFace causal LM at chosen layers, for adapters and calibration."""

import torch

from earlyexit.tuning.progress import progress_bar


@torch.no_grad()
def collect_states(
    model, exit_layers, windows, *, batch_size=8, device=None, desc="teacher states", progress=True, previous=False
):
    """Run the full model over token windows and keep the hidden states the exits see.

    Args:
        model: a transformers causal LM (output_hidden_states supported).
        exit_layers: layer counts k (hidden state after the first k decoder layers).
        windows: LongTensor [n, T] of token ids.
        batch_size: windows per forward pass.
        device: where to run (default: the model's device).
        desc, progress: the progress bar's label, and whether to show it.
        previous: also keep the states after k - 1 layers of every exit layer k (0: the embedding), which
            the state measure compares with those after k.
    Returns:
        (states, final): ``states[k]`` float32 [n * T, d] after k layers (before the final norm), for each
        exit layer k (and k - 1 with ``previous``); ``final`` float32 [n * T, d], the last hidden state
        after the final norm (the lm_head input).
    """
    device = device or next(model.parameters()).device
    layers = sorted({*exit_layers, *(k - 1 for k in exit_layers)}) if previous else list(exit_layers)
    states = {k: [] for k in layers}
    final = []
    bar = progress_bar(total=windows.shape[0], desc=desc, unit="seq", enabled=progress)
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(device)
        hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        for k in layers:
            states[k].append(hs[k].reshape(-1, hs[k].shape[-1]).float().cpu())
        final.append(hs[-1].reshape(-1, hs[-1].shape[-1]).float().cpu())
        bar.update(ids.shape[0])
    bar.close()
    return {k: torch.cat(v) for k, v in states.items()}, torch.cat(final)
