"""tools.rehearse: the report's table and its argument checks (the whole rehearsal runs
with ``make rehearse``; BENCHMARKS.md holds one)."""
from tools import rehearse


def test_the_table_lists_stages_in_the_order_they_ran_with_seconds_and_coverage():
    scores = {"samples_per_family": {"FlatVel_A": 4, "Style_A": 4},
              "stages": [{"stage": "member:r/best", "seconds": 12.2, "samples": 8, "candidates": None,
                          "mae": {"all": 80.0, "FlatVel_A": 40.0, "Style_A": 120.0}},
                         {"stage": "refine_layered", "seconds": 300.4, "samples": 2, "candidates": 4,
                          "mae": {"all": 70.0, "FlatVel_A": 20.0, "Style_A": 120.0}}]}
    text = rehearse._table(scores, "Default plan")
    lines = text.splitlines()
    assert lines[0] == "### Default plan"
    assert "| stage | s | samples | all | FlatVel_A (4) | Style_A (4) |" in lines
    assert "| member:r/best | 12 | 8 | 80.0 | 40.0 | 120.0 |" in lines
    assert "| refine_layered | 300 | 2 of 4 | 70.0 | 20.0 | 120.0 |" in lines


def test_a_train_share_outside_0_1_is_refused(capsys):
    assert rehearse.main(["--train-share", "1.5"]) == 2
    assert "--train-share must be between 0 and 1" in capsys.readouterr().err
