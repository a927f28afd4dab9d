import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tools.build import BuildError, build, build_notebook, resolve_modules

KERNEL = '''# %% [markdown]
# # Demo

# %% tags=["parameters"]
value = 2

# %%
import fwi_core
from fwi_core.pkg import helper
from fwi_core.pkg.mod import twice
import sys
result = twice(value)
where = sys.modules["fwi_core.pkg.mod"].__file__
print("RESULT", result, helper.NAME, fwi_core.__version__, where)
'''

META = {"id": "someone/demo-kernel", "title": "Demo Kernel", "code_file": "demo.ipynb", "language": "python",
        "kernel_type": "notebook", "competition_sources": ["waveform-inversion"]}


def make_root(tmp_path: Path, kernel: str = KERNEL, meta: dict = META) -> Path:
    root = tmp_path / "repo"
    files = {
        "fwi_core/__init__.py": '__version__ = "9.9.9"\n',
        "fwi_core/pkg/__init__.py": "",
        "fwi_core/pkg/mod.py": "from . import helper\n\n\ndef twice(x):\n    from ..util import double  # lazy\n    return double(x)\n",
        "fwi_core/pkg/helper.py": 'NAME = "inlined"\n',
        "fwi_core/util.py": "def double(x):\n    return 2 * x\n",
        "fwi_core/unused.py": "raise RuntimeError('must not be inlined')\n",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (root / "kernels").mkdir()
    (root / "kernels" / "demo.py").write_text(kernel)
    (root / "kernel-metadata").mkdir()
    (root / "kernel-metadata" / "demo.json").write_text(json.dumps(meta))
    return root


def test_resolves_transitive_modules_only(tmp_path):
    root = make_root(tmp_path)
    mods = resolve_modules(KERNEL, "demo", root)
    assert mods == ["fwi_core", "fwi_core.pkg", "fwi_core.pkg.helper", "fwi_core.pkg.mod", "fwi_core.util"]


def test_notebook_is_valid_and_reproducible(tmp_path):
    root = make_root(tmp_path)
    out = tmp_path / "build"
    build(["demo"], out, root)
    nb_path = out / "demo" / "demo.ipynb"
    first = nb_path.read_bytes()
    meta_first = (out / "demo" / "kernel-metadata.json").read_bytes()
    build(["demo"], out, root)
    assert nb_path.read_bytes() == first and (out / "demo" / "kernel-metadata.json").read_bytes() == meta_first
    nb = nbformat.read(nb_path, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.nbformat_minor == 5
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.cells[0].cell_type == "markdown"
    assert "9.9.9" in nb.cells[0].source and nb.metadata.fwi_toolkit.content_hash in nb.cells[0].source
    assert [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])][0].source.strip() == "value = 2"
    titles = [c.source.splitlines()[0] for c in nb.cells if c.source.startswith("%%writefile")]
    assert titles[0] == "%%writefile {_FWI_VENDOR}/fwi_core/__init__.py"
    assert any(t.endswith("fwi_core/pkg/mod.py") for t in titles)
    assert not any("unused" in t for t in titles)
    meta = json.loads(meta_first)
    assert meta["enable_internet"] is False and meta["code_file"] == "demo.ipynb"


def test_built_notebook_runs_without_fwi_core_and_wins_over_installed(tmp_path):
    papermill = pytest.importorskip("papermill")
    root = make_root(tmp_path)
    build(["demo"], tmp_path / "build", root)
    # an "installed" fwi_core that must lose against the inlined copy
    site = tmp_path / "site"
    (site / "fwi_core" / "pkg").mkdir(parents=True)
    (site / "fwi_core" / "__init__.py").write_text('__version__ = "0.0-installed"\n')
    (site / "fwi_core" / "pkg" / "__init__.py").write_text("")
    (site / "fwi_core" / "pkg" / "helper.py").write_text('NAME = "installed"\n')
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(site)
    try:
        papermill.execute_notebook(str(tmp_path / "build/demo/demo.ipynb"), str(run_dir / "out.ipynb"),
                                   parameters={"value": 21}, cwd=str(run_dir), kernel_name="python3",
                                   progress_bar=False)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    nb = nbformat.read(run_dir / "out.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    line = [ln for ln in text.splitlines() if ln.startswith("RESULT")][0]
    assert line.split()[1:4] == ["42", "inlined", "9.9.9"]
    assert line.endswith("fwi_core/pkg/mod.py")


def test_missing_module_fails_clearly(tmp_path):
    root = make_root(tmp_path, kernel=KERNEL.replace("from fwi_core.pkg import helper",
                                                     "from fwi_core.nothere import thing"))
    with pytest.raises(BuildError, match="imports 'fwi_core.nothere', which is not a module"):
        build_notebook("demo", root)
    root2 = make_root(tmp_path / "b")
    (root2 / "fwi_core/util.py").write_text("from .ghost import x\n")
    with pytest.raises(BuildError, match=r"fwi_core/util.py imports 'fwi_core.ghost'"):
        build_notebook("demo", root2)


@pytest.mark.parametrize("change, match", [
    ({"id": "no-slash"}, "id must be 'user/slug'"),
    ({"title": "Demo"}, "at least 5 characters"),
    ({"title": "Another Title"}, "does not match the id's slug"),
    ({"code_file": "other.ipynb"}, "code_file must be 'demo.ipynb'"),
    ({"competition_sources": []}, "competition_sources must include 'waveform-inversion'"),
    ({"enable_internet": "no"}, "enable_internet must be true or false"),
    ({"fwi_toolkit": {"wheels": ["timm"]}}, "wheels_dataset"),
])
def test_invalid_metadata_fails_clearly(tmp_path, change, match):
    root = make_root(tmp_path, meta={**META, **change})
    with pytest.raises(BuildError, match=match):
        build_notebook("demo", root)


def test_wheels_dataset_adds_offline_install_cell(tmp_path):
    root = make_root(tmp_path, meta={**META, "fwi_toolkit": {"wheels": ["timm"], "wheels_dataset": "someone/fwi-wheels"}})
    nb, meta, _ = build_notebook("demo", root)
    assert "someone/fwi-wheels" in meta["dataset_sources"] and "fwi_toolkit" not in meta
    install = [c.source for c in nb.cells if "--no-index" in c.source]
    assert install and "'timm'" in install[0] and "--find-links" in install[0]


def test_kernel_needs_one_parameters_cell(tmp_path):
    root = make_root(tmp_path, kernel=KERNEL.replace(' tags=["parameters"]', ""))
    with pytest.raises(BuildError, match="exactly one cell tagged 'parameters'"):
        build_notebook("demo", root)


def test_cli_reports_errors_without_traceback(tmp_path):
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "tools.build", "no_such_kernel", "--out", str(tmp_path)],
                       cwd=root, capture_output=True, text=True)
    assert r.returncode == 1 and "build failed" in r.stderr and "Traceback" not in r.stderr
