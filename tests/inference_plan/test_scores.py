"""StageScores: the infer kernel's per-stage MAE per family when the test solution is known
(a rehearsal), the final maps of the first files, the table joined with the run summary."""
import json

import numpy as np

from fwi_core.inference_plan import StageScores
from tests.inference_plan.helpers import FakeCRF, fake_ensemble, planner, small_source


def test_stage_scores_follow_the_stages_in_the_order_they_ran(tmp_path):
    n = 6
    src, _ = small_source(n, seed=2)
    rng = np.random.default_rng(0)
    truth = rng.uniform(1500, 4500, (n, 70, 70)).astype(np.float32)
    fams = np.array(["FlatVel_A", "Style_A"] * 3)
    np.savez(tmp_path / "test_solution.npz", oids=np.array(src.ids), velocity=truth[:, None], family=fams)
    scores = StageScores(src.ids, tmp_path / "test_solution.npz", keep=2)
    p = planner(fake_ensemble(2), src, tmp_path, stages=["members", "crf"], crf=FakeCRF(), keep_state=True,
                on_stage_end=scores)
    s = p.run()
    final = p.read_prediction(0, n)
    np.testing.assert_array_equal(scores.maps, final[:2])
    table = scores.table(s)
    assert [r["stage"] for r in table] == ["member:m0", "member:m1", "crf"]
    err = np.abs(final[:, :, 1::2] - truth[:, :, 1::2]).mean((1, 2))
    assert abs(table[-1]["mae"]["all"] - err.mean()) < 1e-3
    assert abs(table[-1]["mae"]["Style_A"] - err[fams == "Style_A"].mean()) < 1e-3
    assert table[0]["samples"] == n and table[-1]["status"] == "complete"
    text = scores.format(s)
    assert text.splitlines()[0] == "| stage | s | samples | MAE all | MAE FlatVel_A | MAE Style_A |"
    saved = json.loads(scores.save(tmp_path / "stage_scores.json", s).read_text())
    assert saved["samples_per_family"] == {"FlatVel_A": 3, "Style_A": 3} and len(saved["stages"]) == 3
    # without a solution: only the kept maps
    bare = StageScores(src.ids, None, keep=1)
    planner(fake_ensemble(1), src, tmp_path / "b", stages=["members"], on_stage_end=bare).run()
    assert bare.maps.shape == (1, 70, 70) and bare.rows == []
