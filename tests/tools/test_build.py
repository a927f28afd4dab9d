import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tools.build import BuildError, build, build_notebook, resolve_modules, vendored_size

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
    about = nb.cells[2]    # after the kernel's title and its parameters cell
    assert about.cell_type == "markdown" and about.source.startswith("## About this notebook")
    assert "9.9.9" in about.source and nb.metadata.fwi_toolkit.content_hash in about.source
    assert [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])][0].source.strip() == "value = 2"
    titles = [c.source.splitlines()[0] for c in nb.cells if c.source.startswith("%%fwi_module")]
    assert titles[0] == "%%fwi_module fwi_core/__init__.py"
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


# ----------------------------------------------------------------- slim, readable notebooks
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """A copy of the repository's build inputs: the checkout may change while the tests run."""
    import shutil

    dest = tmp_path_factory.mktemp("snapshot")
    for part in ("fwi_core", "kernels", "kernel-metadata"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.ipynb"))
    return dest


def _kind(cell) -> str:
    """'params', 'about', 'wheels', 'bootstrap', 'module', 'import-check' or 'kernel'."""
    src = cell.source
    if "parameters" in cell.metadata.get("tags", []):
        return "params"
    if cell.cell_type == "markdown":
        return "about" if src.startswith("## About this notebook") else "kernel"
    if "--no-index" in src:
        return "wheels"
    if "_FWI_VENDOR = tempfile.mkdtemp(" in src:
        return "bootstrap"
    if src.startswith("%%fwi_module "):
        return "module"
    if src.startswith("import importlib\nimportlib.invalidate_caches()"):
        return "import-check"
    return "kernel"


def _params_index(nb) -> int:
    return [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])][0]


def test_cell_order_puts_parameters_first(tmp_path):
    root = make_root(tmp_path, meta={**META, "fwi_toolkit": {"wheels": ["timm"], "wheels_dataset": "someone/w"}})
    nb, _, modules = build_notebook("demo", root)
    kinds = [_kind(c) for c in nb.cells]
    assert kinds == (["kernel", "params", "about", "wheels", "bootstrap"] + ["module"] * len(modules)
                     + ["import-check", "kernel"]), kinds
    assert nb.cells[0].source == "# Demo" and nb.cells[-1].source.startswith("import fwi_core")


@pytest.mark.parametrize("kernel", ["infer", "train"])
def test_real_kernels_parameters_cell_comes_first(kernel, snapshot):
    nb, _, modules = build_notebook(kernel, snapshot)
    assert _params_index(nb) < 3, [c.source.splitlines()[0] for c in nb.cells[:4]]
    assert all(c.cell_type == "markdown" for c in nb.cells[:_params_index(nb)])
    hidden = [c for c in nb.cells if _kind(c) in ("bootstrap", "module", "import-check")]
    assert len(hidden) == len(modules) + 2
    assert all(c.metadata.jupyter.source_hidden is True and c.metadata["_kg_hide-input"] is True for c in hidden)
    assert not any(c.metadata.get("jupyter", {}).get("source_hidden") for c in nb.cells if _kind(c) in ("params", "kernel"))
    assert (len(modules), nb.metadata.fwi_toolkit.module_lines) == vendored_size(kernel, snapshot)


def test_infer_notebook_carries_no_training_engine(snapshot):
    """The infer kernel loads trained models through fwi_core.models.checkpoint: the
    training engine and the training-side modules stay out of its notebook, which is smaller
    than before the layering (the README's notebook table quotes both figures)."""
    nb, _, modules = build_notebook("infer", snapshot)
    assert [m for m in modules if m == "fwi_core.train" or m.startswith("fwi_core.train.")] == []
    assert "fwi_core.recipes" not in modules and "fwi_core.models.checkpoint" in modules
    # fitting and simulating training data are training-side: imported by module name, never
    # re-exported by a package the infer kernel imports
    training_side = {"fwi_core.physics.simulated", "fwi_core.physics.map_augment", "fwi_core.ensemble.fit",
                     "fwi_core.ensemble.meta_fit", "fwi_core.ensemble.family_fit", "fwi_core.ensemble.optimize",
                     "fwi_core.inference_plan.measure"}
    assert sorted(training_side & set(modules)) == []
    readme = (ROOT / "README.md").read_text()
    row = re.search(r"\| before the layering \(commit \w+\) \| (\d+) of \d+ \| ([\d,]+) \|", readme)
    assert row, "README: no 'before the layering' row in the notebook table"
    assert nb.metadata.fwi_toolkit.module_lines < int(row.group(2).replace(",", ""))


def test_every_vendored_cell_is_hidden(tmp_path):
    root = make_root(tmp_path)
    nb, _, modules = build_notebook("demo", root)
    vendored = [c for c in nb.cells if c.source.startswith("%%fwi_module ")]
    assert [c.source.splitlines()[0].split()[1] for c in vendored] == [
        "fwi_core/__init__.py", "fwi_core/pkg/__init__.py", "fwi_core/pkg/helper.py", "fwi_core/pkg/mod.py",
        "fwi_core/util.py"]
    for c in nb.cells:
        hidden = _kind(c) in ("bootstrap", "module", "import-check")
        assert bool(c.metadata.get("jupyter", {}).get("source_hidden")) is hidden, c.source[:40]


def test_module_figures_in_metadata_and_printed_line(tmp_path, capsys):
    root = make_root(tmp_path)
    # __init__ 1 line, pkg/__init__ 0, helper 1, mod 6, util 2
    assert vendored_size("demo", root) == (5, 10)
    build(["demo"], tmp_path / "build", root)
    nb = nbformat.read(tmp_path / "build/demo/demo.ipynb", as_version=4)
    assert nb.metadata.fwi_toolkit.module_lines == 10 and len(nb.metadata.fwi_toolkit.modules) == 5
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith(f"demo.ipynb (5 fwi_core modules, 10 lines, {len(nb.cells)} cells)"), line
    assert "(10 lines)" in nb.cells[2].source


def test_thousands_separator_in_printed_line(tmp_path, capsys):
    root = make_root(tmp_path)
    (root / "fwi_core/util.py").write_text("def double(x):\n    return 2 * x\n" + "# pad\n" * 1200)
    build(["demo"], tmp_path / "build", root)
    assert "(5 fwi_core modules, 1,210 lines, " in capsys.readouterr().out


@pytest.mark.parametrize("where", ["params", "before"])
def test_fwi_core_import_before_the_bootstrap_fails_clearly(tmp_path, where):
    if where == "params":
        kernel = KERNEL.replace("value = 2\n", "from fwi_core.util import double\nvalue = 2\n")
        match = r"kernels/demo.py: cell 2 \(the parameters cell\) imports 'fwi_core.util'"
    else:
        kernel = KERNEL.replace("# %% [markdown]\n# # Demo\n", "# %%\nimport fwi_core\n")
        match = r"kernels/demo.py: cell 1 \(a cell before the parameters cell\) imports 'fwi_core'"
    root = make_root(tmp_path, kernel=kernel)
    with pytest.raises(BuildError, match=match):
        build_notebook("demo", root)


def test_executed_notebook_is_quiet_until_the_kernel_and_parameters_precede_code(tmp_path):
    papermill = pytest.importorskip("papermill")
    root = make_root(tmp_path)
    build(["demo"], tmp_path / "build", root)
    built = nbformat.read(tmp_path / "build/demo/demo.ipynb", as_version=4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    papermill.execute_notebook(str(tmp_path / "build/demo/demo.ipynb"), str(run_dir / "out.ipynb"),
                               parameters={"value": 5}, cwd=str(run_dir), kernel_name="python3",
                               progress_bar=False)
    nb = nbformat.read(run_dir / "out.ipynb", as_version=4)
    assert len(nb.cells) == len(built.cells) + 1                   # papermill's injected-parameters cell
    injected = [i for i, c in enumerate(nb.cells) if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected == [_params_index(nb) + 1] and injected[0] < 3
    quiet = [c for c in nb.cells if _kind(c) in ("bootstrap", "module", "import-check")]
    assert len(quiet) == len(built.metadata.fwi_toolkit.modules) + 2
    for c in quiet:
        assert c.outputs == [], (c.source.splitlines()[0], c.outputs)
        assert c.metadata.jupyter.source_hidden is True
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert text.startswith("RESULT 10 inlined 9.9.9 ") and text.count("\n") == 1, text
    # the vendored files are exactly the modules (an empty module gets a comment)
    where = text.split()[-1]
    vendor = Path(where).parents[2]
    assert (vendor / "fwi_core/pkg/mod.py").read_text() == (root / "fwi_core/pkg/mod.py").read_text()
    assert (vendor / "fwi_core/util.py").read_text() == (root / "fwi_core/util.py").read_text()
    assert (vendor / "fwi_core/pkg/__init__.py").read_text() == "# (empty module)\n"


def test_real_build_is_byte_identical_twice(tmp_path, snapshot, capsys):
    build(["infer", "train"], tmp_path / "a", snapshot)
    build(["infer", "train"], tmp_path / "b", snapshot)
    for k in ("infer", "train"):
        for f in (f"{k}.ipynb", "kernel-metadata.json"):
            assert (tmp_path / "a" / k / f).read_bytes() == (tmp_path / "b" / k / f).read_bytes(), f
        nbformat.validate(nbformat.read(tmp_path / "a" / k / f"{k}.ipynb", as_version=4))
    lines = capsys.readouterr().out.splitlines()
    assert all(re.search(r"\(\d+ fwi_core modules, [\d,]+ lines, \d+ cells\)$", ln) for ln in lines), lines
