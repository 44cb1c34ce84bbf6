"""The demo's calibrated-policy cache (earlyexit.apps.policy_cache) and its command-line flags; no SmolLM2 needed."""

import io
import json
import os
from types import SimpleNamespace

import pytest

from earlyexit.apps import policy_cache as pc


def _key(**changes):
    calibration = dict(exit_layers=[12, 18, 24], measure="max_prob", target_agreement=0.95, objective="time")
    calibration.update(changes)
    model = dict(file="/models/smollm2.gguf", bytes=1234, config="abc")
    return pc.policy_key(model, "cpu", "float32", **calibration)


POLICY = dict(exit_layers=[24], thresholds=[0.987], measure="max_prob", target_agreement=0.95)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A private cache folder, also as $EARLYEXIT_CACHE_DIR: no test writes to the real home cache."""
    monkeypatch.setenv(pc.CACHE_ENV, str(tmp_path))
    return tmp_path


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv(pc.CACHE_ENV, str(tmp_path / "ee"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pc.cache_dir() == str(tmp_path / "ee")
    monkeypatch.setenv(pc.CACHE_ENV, "")  # empty counts as unset
    assert pc.cache_dir() == os.path.join(str(tmp_path / "xdg"), "earlyexit")
    monkeypatch.delenv(pc.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pc.cache_dir() == os.path.join(str(tmp_path / "home"), ".cache", "earlyexit")


def test_hit_returns_the_saved_policy_from_the_env_folder(folder):
    path = pc.save_policy(_key(), POLICY)
    assert os.path.dirname(path) == str(folder) and os.path.isfile(path)
    assert pc.load_policy(_key()) == POLICY
    with open(path) as f:
        assert json.load(f)["key"] == _key()  # the file names what it was computed for


def test_key_mismatch_is_a_miss(folder):
    pc.save_policy(_key(), POLICY)
    assert pc.load_policy(_key(target_agreement=0.99)) is None
    assert pc.load_policy(_key(exit_layers=[12, 24])) is None
    other = dict(_key(), machine=dict(_key()["machine"], host="another-host"))
    assert pc.load_policy(other) is None
    # A file whose stored key differs from the one its name stands for is not used either.
    path = pc.policy_file(_key())
    with open(path) as f:
        record = json.load(f)
    record["key"]["dtype"] = "bfloat16"
    with open(path, "w") as f:
        json.dump(record, f)
    assert pc.load_policy(_key()) is None


def test_key_covers_machine_versions_and_calibration():
    key = _key()
    assert key["machine"]["device_type"] == "cpu" and key["machine"]["host"]
    assert key["machine"]["device_name"] and key["machine"]["cpu_threads"] >= 1
    assert set(key["versions"]) == {"torch", "transformers", "earlyexit"}
    assert key["calibration"]["exit_layers"] == [12, 18, 24] and key["dtype"] == "float32"
    assert pc.policy_file(_key()) == pc.policy_file(_key())
    assert pc.policy_file(_key()) != pc.policy_file(_key(target_agreement=0.9))


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"policy": {}}', b"\xff\xfe\x00"])
def test_corrupt_file_warns_once_and_misses(folder, content):
    path = pc.policy_file(_key())
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    warn = io.StringIO()
    assert pc.load_policy(_key(), warn=warn) is None
    text = warn.getvalue()
    assert text.count("\n") == 1 and path in text and "ignoring" in text
    pc.save_policy(_key(), POLICY)  # recomputed: the corrupt file is replaced
    assert pc.load_policy(_key()) == POLICY


def test_write_is_atomic(folder):
    path = pc.save_policy(_key(), POLICY)
    assert os.listdir(folder) == [os.path.basename(path)]  # no temporary file left
    with pytest.raises(TypeError):
        pc.save_policy(_key(), dict(POLICY, bad=object()))  # fails half-way through writing
    assert os.listdir(folder) == [os.path.basename(path)]
    assert pc.load_policy(_key()) == POLICY  # the old file is intact
    pc.save_policy(_key(), dict(POLICY, thresholds=[0.5]))  # --no-cache: overwritten
    assert pc.load_policy(_key())["thresholds"] == [0.5] and len(os.listdir(folder)) == 1


def test_save_creates_missing_folders(tmp_path):
    sub = tmp_path / "a" / "b"
    path = pc.save_policy(_key(), POLICY, folder=str(sub))
    assert os.path.dirname(path) == str(sub) and pc.load_policy(_key(), folder=str(sub)) == POLICY


def test_model_identity(tmp_path):
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"x" * 10)
    config = SimpleNamespace(to_dict=lambda: {"num_hidden_layers": 30})
    ident = pc.model_identity(SimpleNamespace(config=config), str(weights))
    assert ident["file"] == str(weights) and ident["bytes"] == 10
    other = SimpleNamespace(config=SimpleNamespace(to_dict=lambda: {"num_hidden_layers": 12}))
    assert pc.model_identity(other, str(weights))["config"] != ident["config"]


def test_thresholds_json_is_the_policy_record(tmp_path):
    pytest.importorskip("transformers")
    from earlyexit.apps.calibrate_cmd import THRESHOLDS_FILE, save_thresholds

    eem = SimpleNamespace(exit_layers=[24], measure="max_prob")
    report = SimpleNamespace(
        thresholds=[0.987],
        agreement=0.958,
        mean_layers=28.96,
        target_agreement=0.95,
        tokens=8192,
        objective="time",
        dropped_layers=[12, 18],
        time_per_token_s=0.02,
        full_depth_time_s=0.021,
    )
    save_thresholds(str(tmp_path), eem, report)
    with open(tmp_path / THRESHOLDS_FILE) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(pc.policy_record(eem, report)))
    assert saved["thresholds"] == [0.987] and saved["dropped_layers"] == [12, 18]
    record = pc.policy_record(eem, report, seconds=12.5)
    assert record["calibration_seconds"] == 12.5 and isinstance(record["report"], str)


def test_cli_flags(monkeypatch):
    from earlyexit.apps.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.threshold is None and args.target_agreement == 0.95 and args.no_cache is False
    args = build_parser().parse_args(["demo", "--no-cache", "--target-agreement", "0.9", "--threshold", "0.8"])
    assert args.no_cache is True and args.target_agreement == 0.9 and args.threshold == 0.8
    for bad in ("0", "1.5", "x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["demo", "--target-agreement", bad])


def test_cli_passes_the_flags_to_run_demo(monkeypatch):
    pytest.importorskip("gguf")
    from earlyexit.apps import cli, demo, smollm2

    calls = []
    monkeypatch.setattr(smollm2, "gguf_path", lambda: ("/nowhere", "model.gguf"))
    monkeypatch.setattr(demo, "run_demo", lambda *a, **kw: calls.append((a, kw)))
    cli.main(["demo", "--no-cache", "--target-agreement", "0.9"])
    cli.main(["demo", "--threshold", "0.8"])
    (_, first), (_, second) = calls
    assert first["cache"] is False and first["target_agreement"] == 0.9 and first["threshold"] is None
    assert second["cache"] is True and second["target_agreement"] == 0.95 and second["threshold"] == 0.8


def test_policy_texts():
    from earlyexit.apps.demo import OFF, exact_policy_text, exit_policy_text

    eem = SimpleNamespace(exit_layers=[12, 24], thresholds=[0.93, 0.8812], measure="max_prob")
    assert exit_policy_text(eem, "target 95%") == "exits 12:0.93 24:0.881 (max_prob >=; target 95%)"
    off = SimpleNamespace(exit_layers=[], thresholds=[], measure="max_prob")
    assert exit_policy_text(off, "target 95%").startswith(OFF)
    stats = dict(draft_depth=12, draft_threshold=0.8, block_lengths={1: 3, 4: 2}, plain_steps=5, draft_rounds=5)
    assert exact_policy_text(stats) == "draft depth 12 thr 0.8, blocks 1:3 4:2; 5 rounds + 5 plain"
    assert exact_policy_text(dict(plain_steps=24, draft_rounds=0)).startswith("plain decoding (24 steps")


class _CharTokenizer:
    """Characters as token ids (enough for the calibration's windows)."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ord(c) % 298 for c in text]}


def test_demo_calibrates_once_then_reuses_the_cache(folder, monkeypatch):
    pytest.importorskip("transformers")
    from tiny_models import tiny_causal_lm

    from earlyexit import EarlyExitLM
    from earlyexit.apps import demo

    monkeypatch.setitem(demo.CALIBRATION, "seq_len", 32)
    monkeypatch.setitem(demo.CALIBRATION, "max_tokens", 1024)
    model = tiny_causal_lm("llama", num_layers=6)

    def run(target=0.9, cache=True):
        eem, out = EarlyExitLM(model, [2, 4]), io.StringIO()
        policy = demo.calibrated_policy(
            eem, _CharTokenizer(), dtype="float32", target_agreement=target, cache=cache, out=out
        )
        return eem, policy, out.getvalue()

    first, policy, text = run()
    assert "Calibrating" in text and "cached in" in text and len(os.listdir(folder)) == 1
    assert policy["exit_layers"] == first.exit_layers and policy["target_agreement"] == 0.9
    again, cached, text = run()
    assert text.startswith("using the calibrated policy cached in " + str(folder)) and "Calibrating" not in text
    assert cached == policy and (again.exit_layers, again.thresholds) == (first.exit_layers, first.thresholds)
    _, _, text = run(target=0.8)  # another key: calibrated and cached beside the first
    assert "Calibrating" in text and len(os.listdir(folder)) == 2
    _, _, text = run(cache=False)  # --no-cache: recomputed, the same file overwritten
    assert "Calibrating" in text and len(os.listdir(folder)) == 2
