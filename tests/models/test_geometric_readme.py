"""What the README promises about the geometric members (egnn, heat_diffusion,
se3_transformer, meshcnn): table figures, optional packages, the prior argument."""
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fwi_core.models import count_parameters, create_model, model_capabilities

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEMBERS = ["egnn", "heat_diffusion", "se3_transformer", "meshcnn"]


def readme() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("name", MEMBERS)
def test_table_parameters_and_prior(name):
    row = re.search(rf"^\| `{name}` \|.*\| ([\d,]+) \| [\d.]+ \|$", readme(), re.M)
    assert row, f"README model table has no row for {name}"
    torch.manual_seed(0)
    model = create_model(name)
    assert count_parameters(model) == int(row.group(1).replace(",", ""))
    assert model_capabilities(model).accepts_prior


def requirements(dist: str) -> set:
    """Names of the non-optional requirements of an installed distribution."""
    return {re.split(r"[ ;<>=!~\[(]", r.strip())[0].lower().replace("_", "-")
            for r in importlib.metadata.requires(dist) or [] if "extra ==" not in r}


def test_wheels_listed_for_the_optional_packages():
    text = readme()
    blocks = [json.loads("{" + m + "}") for m in re.findall(r'^("fwi_toolkit": \{.*\})$', text, re.M)]
    wheels = [set(b["fwi_toolkit"]["wheels"]) for b in blocks]
    listed = next(w for w in wheels if "e3nn" in w)
    assert {"torch-geometric", "e3nn", "opt-einsum-fx", "opt-einsum"} <= listed
    # e3nn's requirements: the listed wheels plus what Kaggle's image has
    assert requirements("e3nn") <= {"opt-einsum-fx", "torch", "scipy", "sympy"}
    assert requirements("opt-einsum-fx") <= {"opt-einsum", "torch", "packaging"}
    tg_req = requirements("torch-geometric")
    for pkg in tg_req - {"numpy"}:
        assert pkg in text, f"README does not name torch-geometric's requirement {pkg}"


def test_heat_diffusion_and_meshcnn_need_only_torch():
    code = ("import sys; sys.modules['torch_geometric'] = None; sys.modules['e3nn'] = None\n"
            "import fwi_core.models as m\n"
            "for name in ('heat_diffusion', 'meshcnn'):\n"
            "    m.create_model(name, width=4)\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
