"""Registry-wide model tests, parametrised over ``list_models()``: a model is tested the
moment it is registered. Models are built tiny (``TINY``) to keep each test fast on CPU."""
import copy
import fnmatch
import os
import pickle
import subprocess
import sys

import pytest
import torch

from fwi_core.models import (UnknownModelError, count_parameters, create_model,
                             enable_mc_dropout, is_model, list_models, model_capabilities)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Factory kwargs that make a registered model tiny; first matching pattern wins.
TINY = {
    "inversionnet*": dict(width=0.125),
    "specproj_unet*": dict(width=4),
    "convnext_unet*": dict(backbone_kwargs=dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1)),
                           decoder_channels=(16, 8, 8)),
    "caformer_unet*": dict(backbone_kwargs=dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)),
                           decoder_channels=(16, 8, 8)),
    "invertible_unet*": dict(width=4, latent_channels=4, hidden=8, blocks_per_level=1),
    "residual_stacker*": dict(width=4),
    "residual_stage*": dict(backbone="inversionnet", backbone_kwargs=dict(width=0.125), member="heat_diffusion",
                            member_kwargs=dict(width=4, channels=8, blocks=2, mlp_hidden=8)),
    "egnn*": dict(hidden=16, layers=2, trace_dim=8, trace_width=8, decoder_dim=8, heads=2),
    "heat_diffusion*": dict(width=4, channels=8, blocks=2, mlp_hidden=8),
    "se3_transformer*": dict(irreps_hidden="4x0e + 2x1o + 1x2e", scalars_out=4, layers=2, lattice=(4, 3),
                             trace_dim=8, trace_width=8, decoder_dim=8, n_anchors=4, k_lattice=3),
    "meshcnn*": dict(width=4, grid_channels=4, channels=8, blocks=1, mesh_size=10, head_channels=4),
}
EXPECTED = {"inversionnet", "inversionnet_small", "specproj_unet", "convnext_unet",
            "caformer_unet", "invertible_unet", "egnn", "residual_stacker",
            "heat_diffusion", "se3_transformer", "meshcnn", "residual_stage"}


# the zoo: every registered model except the test suite's own tiny models (tests/train/helpers
# registers "tiny_fwi" when another test module imports it before this one is collected)
ZOO = [n for n in list_models() if not n.startswith("tiny_")]


def tiny(name, **overrides):
    kwargs = next((dict(kw) for pat, kw in TINY.items() if fnmatch.fnmatch(name, pat)), {})
    kwargs.update(overrides)
    torch.manual_seed(0)
    return create_model(name, **kwargs)


@pytest.fixture(scope="module")
def batch():
    """A fixed synthetic batch: random seismic and a layered, laterally curved target."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 1000, 70, generator=g).clamp(-3, 3) / 3
    z = torch.linspace(-0.8, 0.6, 70).view(1, 1, 70, 1)
    bend = 0.1 * torch.sin(torch.linspace(0, 3.14, 70)).view(1, 1, 1, 70)
    y = (z + bend * torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)).clamp(-1, 1)
    return x, y


def test_expected_models_registered():
    assert EXPECTED <= set(list_models())
    assert all(is_model(n) for n in EXPECTED)
    assert list_models("inversionnet*") == ["inversionnet", "inversionnet_small"]


def test_unknown_model_raises():
    with pytest.raises(UnknownModelError, match="no_such_model"):
        create_model("no_such_model")
    assert not is_model("no_such_model")


@pytest.mark.parametrize("name", ZOO)
def test_forward_shape_range_and_backward(name, batch):
    x, y = batch
    model = tiny(name).train()
    out = model(x)
    assert out.shape == (2, 1, 70, 70)
    assert torch.isfinite(out).all() and out.abs().max() <= 1
    (out - y).abs().mean().backward()
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, g in grads if g is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(g).all() for _, g in grads)
    assert count_parameters(model) > 0
    with torch.no_grad():
        assert model.eval()(x[:1]).shape == (1, 1, 70, 70)


@pytest.mark.parametrize("name", ZOO)
def test_rejects_bad_input_shape(name):
    model = tiny(name).eval()
    for bad in (torch.zeros(1, 5, 999, 70), torch.zeros(5, 1000, 70), torch.zeros(1, 4, 1000, 70)):
        with pytest.raises(ValueError, match="1000"):
            model(bad)


@pytest.mark.parametrize("name", ZOO)
def test_loss_decreases(name, batch):
    x, y = batch
    model = tiny(name, drop_rate=0.0).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = (model(x) - y).abs().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", [n for n in ZOO if n in list_models(capability="accepts_prior")])
def test_prior_changes_output_and_is_checked(name):
    """Every model that declares ``accepts_prior`` uses the prior (and a zero prior is not
    the same as none) and rejects a prior of the wrong shape or dtype."""
    model = tiny(name).eval()
    caps = model_capabilities(model)
    assert caps.accepts_prior
    torch.manual_seed(1)
    x = torch.randn(2, 5, 1000, 70) / 3
    prior = torch.rand(2, 1, 70, 70) * 2 - 1
    with torch.no_grad():
        base = model(x)
        with_prior = model(x, prior=prior)
        assert not torch.allclose(base, with_prior)
        assert not torch.allclose(with_prior, model(x, prior=-prior))
        if not caps.adds_prior:   # a corrector (residual_stacker) reads no prior as prior 0 by design
            assert not torch.allclose(base, model(x, prior=torch.zeros_like(prior)))  # 0 != no prior
    for bad in (torch.zeros(2, 70, 70), torch.zeros(1, 1, 70, 70), torch.zeros(2, 1, 70, 69),
                torch.zeros(2, 1, 35, 35), torch.zeros(3, 1, 70, 70), torch.zeros(2, 1, 70),
                torch.zeros(2, 1, 70, 70, dtype=torch.long)):
        with pytest.raises(ValueError, match="prior"):
            model(x, prior=bad)


def test_capabilities_are_declared_in_the_registry():
    assert set(list_models(capability="accepts_prior")) >= {"egnn", "heat_diffusion", "meshcnn", "se3_transformer",
                                                           "residual_stacker"}
    assert list_models(capability="adds_prior") == ["residual_stacker"]
    assert "specproj_unet" in list_models(capability="family_terms")
    assert model_capabilities("invertible_unet").inverse_consistency
    assert model_capabilities("inversionnet").names() == []
    assert model_capabilities(tiny("egnn")).names() == ["accepts_prior"]
    assert model_capabilities(torch.nn.Linear(2, 2)).names() == []       # not built by create_model
    with pytest.raises(ValueError, match="unknown capability"):
        list_models(capability="flies")
    with pytest.raises(UnknownModelError):
        model_capabilities("no_such_model")


@pytest.mark.parametrize("name", ZOO)
def test_deepcopy_and_pickle(name):
    """EMA (AveragedModel) deep-copies every model; checkpoints may pickle it."""
    model = tiny(name).eval()
    x = torch.randn(1, 5, 1000, 70, generator=torch.Generator().manual_seed(0)) / 3
    with torch.no_grad():
        y = model(x)
        assert torch.equal(copy.deepcopy(model)(x), y)
        assert torch.equal(pickle.loads(pickle.dumps(model))(x), y)


@pytest.mark.parametrize("name", ZOO)
def test_mc_dropout(name, batch):
    x = batch[0][:2]
    model = tiny(name, drop_rate=0.5)
    enable_mc_dropout(model)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    assert dropouts and all(m.training for m in dropouts)
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        a, b = model(x), model(x)
        assert not torch.allclose(a, b)
        model.eval()
        assert torch.equal(model(x), model(x))


def test_package_imports_without_timm():
    code = ("import sys; sys.modules['timm'] = None\n"
            "import fwi_core.models as m\n"
            "assert 'convnext_unet' in m.list_models()\n"
            "m.create_model('inversionnet', width=0.125)\n"
            "try:\n    m.create_model('convnext_unet')\n"
            "except ImportError as e:\n    assert 'pip install timm' in str(e); print('ok')\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("blocked, names, hint", [
    ("torch_geometric", ["egnn"], "pip install torch-geometric"),
    ("e3nn", ["se3_transformer"], "pip install e3nn"),
])
def test_package_imports_without_graph_libraries(blocked, names, hint):
    """The registry lists the graph members without their optional library; building one
    raises an ImportError that says what to install, here and on Kaggle."""
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "import fwi_core.models as m\n"
            f"assert set({names!r}) <= set(m.list_models())\n"
            "m.create_model('inversionnet', width=0.125)\n"
            f"for name in {names!r}:\n"
            "    try:\n        m.create_model(name)\n"
            "    except ImportError as e:\n"
            f"        assert {hint!r} in str(e) and 'Kaggle' in str(e) and 'wheels dataset' in str(e), e\n"
            "    else:\n        raise AssertionError(name + ' built without ' + sys.argv[0])\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_bench_table():
    from tools.bench_models import run
    table = run(quick=True, pattern="inversionnet_small")
    assert "| inversionnet_small | 6,105,875 |" in table and table.count("\n| ") == 2
