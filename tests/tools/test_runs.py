"""tools.runs across platforms: throughput, seconds per epoch, cost per epoch, best MAE per family."""
import json

import pytest
import torch
from fwi_core.models.checkpoint import read_metadata
from fwi_core.train import train
from tools import runs

from tests.train.helpers import datasets, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_platforms(tmp_path_factory):
    """A run 'on Kaggle' (2 epochs) and one 'on SageMaker' (1 epoch) of the tiny model."""
    tmp = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mp.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
        # each forward sleeps 200 ms: an optimizer step of the global batch of 4 takes 200-400 ms
        train(tiny_cfg(tmp / "kaggle", epochs=2, time_budget=0, model_kwargs={"delay": 0.2}), datasets=datasets())
        mp.delenv("KAGGLE_KERNEL_RUN_TYPE")
        mp.setenv("SM_MODEL_DIR", str(tmp / "sm-model"))
        train(tiny_cfg(tmp / "sagemaker", epochs=1, time_budget=0), datasets=datasets())
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return tmp


def test_checkpoint_metadata_names_platform_device_and_throughput(two_platforms):
    meta = read_metadata(two_platforms / "kaggle" / "run" / "best.pt")
    assert meta["platform"] == "kaggle"
    assert meta["device"].startswith("cpu (") and meta["device"].endswith(" threads)")
    # the global batch of 4 over a mean optimizer step of 200-400 ms
    assert 10 <= meta["samples_per_s"] <= 20


def test_rows_give_seconds_per_epoch_and_cost_from_the_price_table(two_platforms, tmp_path):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"kaggle": 0, "sagemaker": 4.0, "sagemaker|cpu": 3.6, "cpu": 1.0}))
    table = runs.load_prices(str(prices))
    rows = {r["platform"]: r for r in (runs.run_row(p, two_platforms, table) for p in runs.find_runs([str(two_platforms)]))}
    for plat, epochs in (("kaggle", 2), ("sagemaker", 1)):
        r = rows[plat]
        last = read_metadata(runs.CheckpointManager(two_platforms / plat / "run").latest())
        assert r["epoch_s"] == pytest.approx(last["wall_time"] / epochs)
        assert r["samples_s"] == last["samples_per_s"] and r["device"].startswith("cpu")
    assert rows["kaggle"]["cost_epoch"] == 0.0
    # "sagemaker|cpu" (3.6/h) beats "sagemaker" and "cpu": the longest matching key
    assert rows["sagemaker"]["cost_epoch"] == pytest.approx(3.6 * rows["sagemaker"]["epoch_s"] / 3600)


def test_platforms_side_by_side(two_platforms, capsys):
    rows = [runs.run_row(p, two_platforms) for p in runs.find_runs([str(two_platforms)])]
    side = runs.compare(rows)
    assert [(r["platform"], r["runs"]) for r in side] == [("kaggle", 1), ("sagemaker", 1)]
    for s, r in zip(side, sorted(rows, key=lambda r: r["platform"])):
        assert s["best_mae"] == r["best_mae"] and s["mae:A"] == r["mae:A"] and s["cost_epoch"] is None
    assert runs.main([str(two_platforms)]) == 0
    out = capsys.readouterr().out
    assert "By platform" in out and "| kaggle | cpu (" in out


def test_compare_takes_the_best_of_each_platform():
    rows = [{"platform": "colab", "device": "T4", "samples_s": 10.0, "epoch_s": 50.0, "best_mae": 40.0,
             "mae:A": 30.0, "cost_epoch": None},
            {"platform": "colab", "device": "T4", "samples_s": 12.0, "epoch_s": 60.0, "best_mae": 35.0,
             "mae:A": 33.0, "cost_epoch": None},
            {"platform": "local", "device": "cpu", "samples_s": None, "epoch_s": 90.0, "best_mae": 50.0}]
    side = runs.compare(rows)
    assert side[0] == {"platform": "colab", "device": "T4", "runs": 2, "samples_s": 12.0, "epoch_s": 50.0,
                       "cost_epoch": None, "best_mae": 35.0, "mae:A": 30.0}
    assert side[1]["samples_s"] is None and side[1]["mae:A"] is None


def test_price_lookup_and_bad_tables(tmp_path, capsys):
    prices = {"sagemaker": 2.0, "sagemaker|A10G": 1.2, "H100": 2.5, "T4": 0.35}
    assert runs.price_of("sagemaker", "cuda:0 NVIDIA A10G (22.0 GiB)", prices) == 1.2
    assert runs.price_of("sagemaker", "cuda:0 NVIDIA L4 (22.0 GiB)", prices) == 2.0
    assert runs.price_of("cluster", "cuda:3 NVIDIA H100 80GB HBM3 (79.1 GiB)", prices) == 2.5
    assert runs.price_of("local", "cpu (2 threads)", prices) is None
    bad = tmp_path / "p.json"
    bad.write_text('{"kaggle": -1}')
    assert runs.main([str(tmp_path), "--prices", str(bad)]) == 2
    assert "--prices" in capsys.readouterr().err and "per device-hour" in open(runs.__file__).read()
