"""EarlyExitLM on a model sharded by transformers' tensor parallelism (tp_plan="auto"), world 2, gloo, CPU.

The test spawns two processes itself (a FileStore rendezvous, no network port), each loads the same saved
random-weight models (a Llama and one of each family of tests/tiny_models.py: their plans differ, e.g.
Phi-3's fused projections and OLMo 2's whole-projection q/k norms are gathered) with ``tp_plan="auto"``
and runs every mode; the results come back as files and are compared here with the single-process
model's ``generate``. The vocabulary (301) is odd, so the two
lm_head shards are uneven (151 and 150 rows); transformers before 5.21 shards only a vocabulary that
the world size divides, and there it is 300.
"""

import datetime
import os
import random
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

from tiny_models import FAMILY_KINDS, tiny_causal_lm  # noqa: E402

from earlyexit.ops.backends import _release  # noqa: E402

WORLD = 2
L = 6
EXITS = [2, 4]
# transformers 5.21 accepted uneven colwise shards (before, from_pretrained raised "must be divisible").
_UNEVEN_SHARDS = _release(transformers.__version__) >= (5, 21)
VOCAB = 301 if _UNEVEN_SHARDS else 300
NEW = 12
KINDS = ("llama", *FAMILY_KINDS)
#: Exit thresholds at which each tiny model's tokens exit at both exit layers and at full depth (Gemma's
#: final-logit softcap keeps its probabilities low).
THRESHOLDS = {"llama": 0.1, "gemma2": 0.16, "gemma3": 0.16, "phi3": 0.3, "granite": 0.1, "olmo2": 0.3}
DEADLINE_S = 300


def _batch():
    """Three prompts of lengths 7, 4 and 2, left-padded with token 0."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    am = torch.ones_like(ids)
    am[1, :3] = 0
    am[2, :5] = 0
    return ids.masked_fill(am == 0, 0), am


def _load_tp(folder):
    """The saved model sharded by transformers' own plan (tp_plan="auto"), in eval mode, eager attention
    (the one implementation every family has)."""
    load = transformers.AutoModelForCausalLM.from_pretrained
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:  # before DistributedConfig, the plan was a from_pretrained argument
        return load(folder, tp_plan="auto", attn_implementation="eager").eval()
    config = DistributedConfig(tp_plan="auto")
    return load(folder, distributed_config=config, attn_implementation="eager").eval()


def _generate(model, ids, am):
    with torch.no_grad():
        return model.generate(ids, attention_mask=am, max_new_tokens=NEW, do_sample=False, pad_token_id=0)


def _run_modes(model, threshold, ids, am):
    """Every mode on the tensor-parallel model, recording how the exit head and the lm_head are used."""
    import earlyexit
    import earlyexit.hf.forward as forward

    calls = {"exit_check": 0, "exit_check_local": 0, "lm_head": 0}
    inner = forward.exit_check

    def recording_exit_check(hidden, **kwargs):
        calls["exit_check"] += 1
        calls["exit_check_local"] += kwargs.get("group") is None
        return inner(hidden, **kwargs)

    forward.exit_check = recording_exit_check
    model.lm_head.register_forward_pre_hook(lambda *_: calls.__setitem__("lm_head", calls["lm_head"] + 1))
    eem = earlyexit.EarlyExitLM(model, EXITS, threshold=threshold)
    out = {"head": {k: v for k, v in eem.adapter.exit_head.items() if k in ("vocab_start", "vocab_size")}}
    out["head"]["rows"] = eem.adapter.exit_head["weight"].shape[0]

    exit_run = eem.generate(ids, am, max_new_tokens=NEW, mode="exit")
    out.update(exit=exit_run.sequences, exit_layer=exit_run.exit_layer, exit_calls=dict(calls))
    # An unreachable threshold: every token comes from the full-depth greedy path over the local shard.
    full = earlyexit.EarlyExitLM(model, EXITS, threshold=2.0).generate(ids, am, max_new_tokens=NEW, mode="exit")
    out.update(full=full.sequences, full_layer=full.exit_layer, full_calls=dict(calls))
    out["exact"] = eem.generate(ids, am, max_new_tokens=NEW, mode="exact").sequences
    out["exact_calls"] = dict(calls)
    out["generate"] = _generate(model, ids, am)
    out["generate_calls"] = dict(calls)
    # Clocks that disagree between the ranks (up to a second of noise per reading, seeded by rank): exact
    # mode's draft policy learns from timings, yet must choose alike on every rank, or the ranks would
    # wait in different collectives.
    import earlyexit.hf.generate as generate

    clock, noise = generate.synchronized_clock, random.Random(dist.get_rank())
    generate.synchronized_clock = lambda device: clock(device) + noise.random()
    try:
        out["exact_noisy_clocks"] = eem.generate(ids, am, max_new_tokens=NEW, mode="exact").sequences
        # The same under draft_memory: what each rank remembers across calls must stay alike too.
        eem.draft_memory = True
        remembering = [eem.generate(ids, am, max_new_tokens=NEW, mode="exact") for _ in range(3)]
        out["exact_memory"] = [r.sequences for r in remembering]
        out["exact_memory_rounds"] = [
            (r.stats["draft_rounds_remembered"], r.stats["draft_rounds"]) for r in remembering
        ]
    finally:
        generate.synchronized_clock = clock
    return out


def _split_heads_error(folder):
    """The ValueError EarlyExitLM raises for a plan that splits attention heads across ranks."""
    import earlyexit

    model = _load_tp(folder)
    try:
        earlyexit.EarlyExitLM(model, EXITS)
    except ValueError as e:
        return str(e)
    return None


def _worker(rank, folder, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    store = dist.FileStore(os.path.join(out_dir, "store"), WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        out = {kind: _run_modes(_load_tp(os.path.join(folder, kind)), THRESHOLDS[kind], *_batch()) for kind in KINDS}
        out["split_heads_error"] = _split_heads_error(os.path.join(folder, "split_heads"))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """({kind: single-process generate}, [per-rank results]) from one spawned world-2 run."""
    folder = tmp_path_factory.mktemp("tp_models")
    reference = {}
    for kind in KINDS:
        model = tiny_causal_lm(kind, num_layers=L, vocab_size=VOCAB, attn_implementation="eager")
        model.save_pretrained(folder / kind)
        reference[kind] = _generate(model.eval(), *_batch())
    # 3 key/value heads over 2 ranks: transformers' colwise plan splits a head.
    split = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=3,
            vocab_size=64,
        )
    )
    split.save_pretrained(folder / "split_heads")

    out_dir = str(tmp_path_factory.mktemp("tp_out"))
    # Spawned children get this process's sys.path, so they import this module and tiny_models too.
    context = mp.start_processes(_worker, args=(str(folder), out_dir), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"the world-{WORLD} run did not finish in {DEADLINE_S} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    return reference, [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.fixture(params=KINDS)
def runs(world, request):
    """(single-process generate, [per-rank results]) of one model."""
    reference, ranks = world
    return reference[request.param], [r[request.param] for r in ranks]


def test_exit_head_reads_the_local_shard(runs):
    _, ranks = runs
    first = (VOCAB + 1) // 2
    assert [r["head"] for r in ranks] == [
        {"vocab_start": 0, "vocab_size": VOCAB, "rows": first},
        {"vocab_start": first, "vocab_size": VOCAB, "rows": VOCAB - first},
    ]


def test_exact_mode_equals_generate(runs):
    reference, ranks = runs
    for r in ranks:
        assert torch.equal(r["generate"], reference), "transformers' TP generate differs from one process"
        assert torch.equal(r["exact"], reference)
        assert torch.equal(r["exact_noisy_clocks"], reference)
        assert all(torch.equal(s, reference) for s in r["exact_memory"])
    rounds = [r["exact_memory_rounds"] for r in ranks]
    assert rounds[0] == rounds[1] and rounds[0][0][0] == 0 < rounds[0][1][0] < rounds[0][2][0], rounds


def test_exit_mode_identical_on_every_rank(runs):
    _, ranks = runs
    first = ranks[0]
    assert (first["exit_layer"] < L).any() and (first["exit_layer"] == L).any(), "the test needs exits and full depth"
    for r in ranks[1:]:
        assert torch.equal(r["exit"], first["exit"])
        assert torch.equal(r["exit_layer"], first["exit_layer"])


def test_exit_mode_never_gathers_the_lm_head(runs):
    reference, ranks = runs
    for r in ranks:
        for calls in (r["exit_calls"], r["full_calls"]):
            assert calls["lm_head"] == 0, "exit mode ran the (gathering) lm_head forward"
            assert calls["exit_check"] > 0 and calls["exit_check_local"] == 0
        # Float32 greedy exact mode takes its verifier's tokens from the sharded fused check too;
        # model.generate runs lm_head (which shows that the hook counts).
        assert r["exact_calls"]["lm_head"] == 0 and r["exact_calls"]["exit_check_local"] == 0
        assert r["generate_calls"]["lm_head"] > 0
        # Full depth through the sharded fused check equals greedy generate.
        assert torch.equal(r["full"], reference)
        assert (r["full_layer"] == L).all()


def test_split_attention_heads_raise(world):
    _, ranks = world
    for r in ranks:
        assert r["split_heads_error"] is not None and "splits the attention heads" in r["split_heads_error"]
