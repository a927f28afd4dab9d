import json

import numpy as np
import pytest
import torch

from fwi_core.inverse_consistency import ConsistencyFlagger
from fwi_core.data import denormalize_velocity
from fwi_core.models import create_model


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    m = create_model("invertible_unet", width=4, latent_channels=4, hidden=8, blocks_per_level=1,
                     drop_rate=0.0).eval()
    x = torch.randn(6, 5, 1000, 70) / 3
    with torch.no_grad():
        own = denormalize_velocity(m(x))
    return m, x, own


def test_score_of_the_models_own_prediction_is_its_inverse_consistency(model_and_data):
    m, x, own = model_and_data
    f = ConsistencyFlagger(m, 0.5)
    with torch.no_grad():
        want = m.inverse_consistency(x).double().numpy()
    np.testing.assert_allclose(f.score(x, own), want, rtol=1e-4)
    # a final map the latent does not explain (saturated, or another sample's) scores higher
    saturated = torch.full_like(own, 4500.0)
    assert (f.score(x, saturated) > f.score(x, own)).all()


def test_threshold_from_quantile_and_from_targets(model_and_data, tmp_path):
    m, x, own = model_and_data
    bad = own.clone()
    bad[3:] = 4500.0                                   # three aberrant final maps
    truth = own + 5.0                                  # the good ones are close to the truth
    f = ConsistencyFlagger.fit(m, x, bad, truth, quantile=0.5)
    assert f.flag(x, bad).tolist() == [False] * 3 + [True] * 3
    q = ConsistencyFlagger.fit(m, x, own, quantile=0.5)
    scores = q.score(x, own)
    assert q.threshold == pytest.approx(float(np.quantile(scores, 0.5)))
    assert q.flag(x, own).sum() == 3
    path = q.save(tmp_path / "consistency.json")
    assert ConsistencyFlagger.load(m, path).threshold == q.threshold
    (tmp_path / "bad.json").write_text(json.dumps({"thr": 1}))
    with pytest.raises(ValueError, match="bad.json"):
        ConsistencyFlagger.load(m, tmp_path / "bad.json")
    with pytest.raises(TypeError, match="inverse_consistency"):
        ConsistencyFlagger(torch.nn.Linear(2, 2), 1.0)
