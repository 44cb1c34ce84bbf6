"""The measured cost model (earlyexit.measure_costs, CostModel) on a small random-weight Llama (CPU, seconds)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import tiny_causal_lm  # noqa: E402

import earlyexit  # noqa: E402
from earlyexit import CostModel, EarlyExitLM, measure_costs  # noqa: E402

EXITS = [2, 4]


@pytest.fixture(scope="module")
def eem():
    return EarlyExitLM(tiny_causal_lm("llama", num_layers=6), EXITS)


@pytest.fixture(scope="module")
def costs(eem):
    # One thread: on a shared 2-core machine a busy second core stalls every two-thread parallel region,
    # which swamps a tiny model's microsecond layers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure_costs(eem, batch_sizes=(1, 8), context=32, repeats=5)
    finally:
        torch.set_num_threads(threads)


def _synthetic():
    return CostModel(
        rows=(1, 4),
        layer=(1.0, 2.0),
        head=(3.0, 6.0),
        exit_check={2: (3.0, 6.0), 4: (4.0, 8.0)},
        propagate=(0.25, 0.5),
        verify_position=(0.1, 0.4),
        num_layers=6,
        context=32,
        device="cpu",
        dtype="float32",
    )


def test_times_are_positive_and_grow_with_rows(costs):
    assert costs.rows == (1, 8) and costs.num_layers == 6 and set(costs.exit_check) == set(EXITS)
    for rows in (1, 8):
        figures = [costs.layer_s(rows), costs.head_s(rows), costs.propagate_s(rows)]
        figures += [costs.exit_check_s(k, rows) for k in EXITS]
        assert all(t > 0 for t in figures), figures
        # The marginal position is a difference of two timings: at the size of timer noise on a tiny model.
        assert costs.verify_position_s(rows) >= 0
    # Timings vary run to run: 8 rows may not be much slower than 1, but never much faster.
    assert costs.layer_s(8) >= 0.5 * costs.layer_s(1)
    assert costs.head_s(8) >= 0.5 * costs.head_s(1)


def test_cached_per_model_and_arguments(eem, costs):
    assert measure_costs(eem, batch_sizes=(8, 1), context=32, repeats=5) is costs
    other = EarlyExitLM(eem.model, [3])
    assert set(measure_costs(other, batch_sizes=(1,), context=32, repeats=1).exit_check) == {3}


def test_printable(costs):
    text = str(costs)
    assert repr(costs) == text
    lines = text.splitlines()
    assert "layer" in lines[1] and "check@2" in lines[1] and "propagate" in lines[1]
    assert len(lines) == 2 + len(costs.rows)


def test_interpolates_in_rows():
    c = _synthetic()
    assert c.layer_s(1) == 1.0 and c.layer_s(4) == 2.0
    assert c.layer_s(2) == pytest.approx(1.0 + 1.0 / 3)
    assert c.layer_s(8) == pytest.approx(4.0)  # beyond the last count: that count's per-row cost
    assert c.exit_check_s(4, 4) == 8.0 and c.verify_position_s(4) == 0.4 and c.head_s(1) == 3.0
    with pytest.raises(ValueError, match="layer"):
        c.exit_check_s(3)


def test_bad_arguments(eem):
    with pytest.raises(ValueError, match="batch_sizes"):
        measure_costs(eem, batch_sizes=(0, 1))
    with pytest.raises(ValueError, match="batch_sizes"):
        measure_costs(eem, batch_sizes=())
    with pytest.raises(ValueError, match="context"):
        measure_costs(eem, context=0)
    with pytest.raises(ValueError, match="repeats"):
        measure_costs(eem, repeats=1.5)


def test_public_names():
    assert "measure_costs" in earlyexit.__all__ and "CostModel" in earlyexit.__all__
    from earlyexit.tuning import costs

    assert earlyexit.measure_costs is costs.measure_costs and earlyexit.CostModel is costs.CostModel
