import pytest


@pytest.mark.slow
def test_zoo_bench_trains_members_and_a_residual_stage():
    from tools.bench_zoo import run

    tiny = {"specproj_unet": {"width": 4}, "egnn": {"hidden": 16, "layers": 1, "trace_dim": 8, "trace_width": 8,
                                                      "decoder_dim": 8, "heads": 2}}
    table = run(quick=True, members=("specproj_unet", "egnn"), budget=6.0, per_family=1, device="cpu",
                model_kwargs=tiny)
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    names = [r.split(" | ")[0][2:] for r in rows]
    assert names == ["specproj_unet", "egnn", "egnn on specproj_unet's residual"]
    for r in rows:
        cells = r.strip("| ").split(" | ")
        assert len(cells) == 14 and int(cells[1]) > 0 and float(cells[-1]) > 0     # steps ran, an MAE
