"""Build self-contained notebooks (Kaggle, Colab) and SageMaker source folders.

    python -m tools.build [KERNEL ...] [--out build] [--root REPO]           # Kaggle (the default target)
    python -m tools.build --target colab [KERNEL ...] [--drive-folder PATH]  # -> build/colab/<kernel>/
    python -m tools.build --target sagemaker [--requirements PKG ...]       # -> build/sagemaker/

Targets:

- ``kaggle`` (``make build``): what follows.
- ``colab``: the same notebook without Kaggle's metadata file and wheels cell, with a
  ``drive_folder`` parameter (default :data:`DRIVE_FOLDER`) and a cell after the import
  check that mounts Google Drive when that folder is on it and not mounted yet, takes the
  data from it (``data_root`` None: the folder or the competition root inside it) and
  writes the outputs to ``<drive_folder>/outputs/<kernel>`` (``output_dir`` "."), points
  an infer kernel's ``checkpoint_dirs`` at ``<drive_folder>/outputs``, and prints the
  platform (Colab's session limit, the GPU; a hint when the runtime has none). The
  notebook asks Colab for a GPU runtime (``accelerator``). fwi_core is inlined the same
  way: nothing is installed at run time.
- ``sagemaker``: a source folder for the SageMaker PyTorch estimator: ``train_entry.py``
  (calls :mod:`fwi_core.sagemaker_entry`), the ``fwi_core`` modules it needs as files,
  ``build-info.json`` (version, content hash, modules) and, with ``--requirements``, a
  ``requirements.txt`` that SageMaker installs before the entry point runs. Submit it with
  ``python -m tools.sagemaker_job``.

For each ``kernels/<name>.py`` (jupytext percent format) this writes
``build/<name>/<name>.ipynb`` and ``build/<name>/kernel-metadata.json`` (from
``kernel-metadata/<name>.json``). The notebook carries the ``fwi_core`` modules that the
kernel imports, directly or transitively (found by walking the import statements of the
kernel and of each module, lazy imports included), as one readable ``%%fwi_module`` cell
per module titled with its path. A bootstrap cell before them picks a fresh folder, puts it
first on ``sys.path``, drops any ``fwi_core`` already imported (so the inlined code takes
precedence over an installed copy) and defines the ``%%fwi_module`` cell magic, which
writes its cell into that folder without printing anything; relative imports,
``__file__``, module names and tracebacks work as in the repository.

Cell order, so that a reader can change a parameter without scrolling: the kernel's cells
before its ``parameters`` cell (its title), the ``parameters`` cell, a markdown cell about
the build, the optional offline ``pip install`` cell, the bootstrap, the module cells, an
import check, then the rest of the kernel. The bootstrap, module and import-check cells
have their source hidden (``jupyter.source_hidden``; ``_kg_hide-input`` on Kaggle) and
print nothing; their outputs stay visible, so an error would show. The parameters cell and
the cells before it run before the bootstrap, so they may not import ``fwi_core`` (a
:class:`BuildError` says so).

Builds are reproducible (byte-identical for identical inputs: stable cell ids, no
timestamps). A build fails with :class:`BuildError` on an import of a missing fwi_core
module, on invalid metadata or on a syntax error in a kernel (naming the cell and the
line); every kernel is built before any file is written, so a failing build leaves the
previous one as it was, and files are replaced atomically (a killed build's temporary
files are removed by the next build).
"""
from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fwi_core"
COMPETITION = "waveform-inversion"
#: keys of kernel-metadata/<kernel>.json that are ours, not Kaggle's (stripped on build)
TOOLKIT_KEY = "fwi_toolkit"
TARGETS = ("kaggle", "colab", "sagemaker")
#: where each target's build goes by default (``make build``: Kaggle into build/)
DEFAULT_OUT = {"kaggle": ROOT / "build", "colab": ROOT / "build" / "colab", "sagemaker": ROOT / "build" / "sagemaker"}
#: the Colab notebooks' default ``drive_folder`` (the data inside it, outputs in outputs/<kernel>)
DRIVE_FOLDER = "/content/drive/MyDrive/fwi"
DRIVE_MOUNT = "/content/drive"
#: the module the SageMaker entry point runs
SAGEMAKER_MODULE = "fwi_core.sagemaker_entry"


class BuildError(Exception):
    """A kernel or its metadata cannot be built into a valid notebook."""


# --------------------------------------------------------------------------- imports
def module_path(name: str, root: Path = ROOT) -> Optional[Path]:
    """File of module ``fwi_core.a.b`` (module file or package __init__), or None."""
    parts = name.split(".")
    base = root.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports_of(source: str, module: Optional[str], is_pkg: bool, where: str) -> Dict[str, bool]:
    """fwi_core names that ``source`` imports anywhere (lazy imports included), mapped to
    whether they must be modules: ``import a.b`` and ``from a.b import x`` need ``a.b``;
    ``a.b.x`` is included only if it is a submodule (else ``x`` is an attribute)."""
    try:
        tree = ast.parse(source, filename=where)
    except SyntaxError as e:
        raise BuildError(f"{where}: syntax error at line {e.lineno}: {e.msg}") from e
    found: Dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PACKAGE or a.name.startswith(PACKAGE + "."):
                    found[a.name] = True
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if module is None:
                    raise BuildError(f"{where}: relative import outside the package")
                pkg_parts = module.split(".") if is_pkg else module.split(".")[:-1]
                if node.level - 1 > len(pkg_parts) - 1:
                    raise BuildError(f"{where}: relative import beyond the top of {PACKAGE}")
                base_parts = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
                if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                    continue
            found[base] = True
            for a in node.names:
                found.setdefault(f"{base}.{a.name}", False)
    return found


def resolve_modules(kernel_source: str, kernel_name: str, root: Path = ROOT) -> List[str]:
    """Sorted names of every fwi_core module the kernel needs, parent packages included."""
    todo = [(name, req, f"kernels/{kernel_name}.py")
            for name, req in sorted(_imports_of(kernel_source, None, False, f"kernels/{kernel_name}.py").items())]
    needed: Set[str] = set()
    while todo:
        name, required, where = todo.pop()
        if name in needed:
            continue
        path = module_path(name, root)
        if path is None:
            if required:
                raise BuildError(f"{where} imports {name!r}, which is not a module of {PACKAGE} "
                                 f"(no {name.replace('.', '/')}.py or package)")
            continue
        needed.add(name)
        parts = name.split(".")
        for i in range(1, len(parts)):  # parent packages run first on import
            todo.append((".".join(parts[:i]), True, where))
        rel = str(path.relative_to(root))
        for sub, req in sorted(_imports_of(path.read_text(), name, path.name == "__init__.py", rel).items()):
            if sub not in needed:
                todo.append((sub, req, rel))
    return sorted(needed)


# --------------------------------------------------------------------------- metadata
def slugify(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def load_metadata(kernel: str, root: Path = ROOT) -> dict:
    """Validated Kaggle metadata for ``kernel`` (toolkit keys kept under TOOLKIT_KEY)."""
    path = root / "kernel-metadata" / f"{kernel}.json"
    if not path.is_file():
        raise BuildError(f"{path}: missing metadata for kernel {kernel!r}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BuildError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise BuildError(f"{path}: expected a JSON object")
    errors = []
    kid = meta.get("id", "")
    m = re.fullmatch(r"([A-Za-z0-9_\-]+)/([a-z0-9\-]+)", kid) if isinstance(kid, str) else None
    if not m:
        errors.append(f"id must be 'user/slug' (lowercase slug), got {kid!r}")
    title = meta.get("title", "")
    if not isinstance(title, str) or len(title) < 5:
        errors.append(f"title must have at least 5 characters, got {title!r}")
    elif m and slugify(title) != m.group(2):
        errors.append(f"title {title!r} slugifies to {slugify(title)!r}, which does not match the id's slug "
                      f"{m.group(2)!r}")
    if meta.get("code_file") != f"{kernel}.ipynb":
        errors.append(f"code_file must be {kernel + '.ipynb'!r}, got {meta.get('code_file')!r}")
    if meta.get("language", "python") != "python":
        errors.append(f"language must be 'python', got {meta.get('language')!r}")
    if meta.get("kernel_type", "notebook") != "notebook":
        errors.append(f"kernel_type must be 'notebook' (the build makes notebooks), got {meta.get('kernel_type')!r}")
    comps = meta.get("competition_sources", [])
    if not isinstance(comps, list) or COMPETITION not in comps:
        errors.append(f"competition_sources must include {COMPETITION!r}, got {comps!r}")
    for key in ("dataset_sources", "kernel_sources", "model_sources"):
        if not isinstance(meta.get(key, []), list):
            errors.append(f"{key} must be a list")
    for key in ("is_private", "enable_gpu", "enable_tpu", "enable_internet"):
        if key in meta and not isinstance(meta[key], bool):
            errors.append(f"{key} must be true or false, got {meta[key]!r}")
    extra = meta.get(TOOLKIT_KEY, {})
    if not isinstance(extra, dict):
        errors.append(f"{TOOLKIT_KEY} must be an object")
    elif extra.get("wheels") and not extra.get("wheels_dataset"):
        errors.append(f"{TOOLKIT_KEY}.wheels needs {TOOLKIT_KEY}.wheels_dataset ('user/dataset-slug')")
    if errors:
        raise BuildError(f"{path}: invalid kernel metadata:\n  - " + "\n  - ".join(errors))
    meta.setdefault("language", "python")
    meta.setdefault("kernel_type", "notebook")
    meta.setdefault("is_private", True)
    meta.setdefault("enable_gpu", False)
    meta.setdefault("enable_tpu", False)
    meta.setdefault("enable_internet", False)  # the CLI's default is true; code competitions need false
    for key in ("dataset_sources", "kernel_sources", "model_sources"):
        meta.setdefault(key, [])
    wheels_ds = extra.get("wheels_dataset") if isinstance(extra, dict) else None
    if wheels_ds and wheels_ds not in meta["dataset_sources"]:
        meta["dataset_sources"].append(wheels_ds)
    return meta


# --------------------------------------------------------------------------- notebook
#: the cell magic that the bootstrap defines and every module cell starts with
MAGIC = "fwi_module"

BOOTSTRAP = '''# fwi_core {version} ({digest}) is inlined below, one hidden cell per module. This cell makes
# the inlined copy win over any installed fwi_core (a fresh folder first on sys.path, old
# modules dropped) and defines %%{magic} PATH, which writes its cell to that folder quietly.
import os, sys, tempfile
_FWI_VENDOR = tempfile.mkdtemp(prefix="fwi_core_")
for _d in {dirs!r}:
    os.makedirs(os.path.join(_FWI_VENDOR, _d), exist_ok=True)
sys.path.insert(0, _FWI_VENDOR)
for _m in [m for m in sys.modules if m == "fwi_core" or m.startswith("fwi_core.")]:
    del sys.modules[_m]


def _fwi_write_module(line, cell):
    with open(os.path.join(_FWI_VENDOR, line.strip()), "w", encoding="utf-8") as f:
        f.write(cell)


get_ipython().register_magic_function(_fwi_write_module, "cell", "{magic}")'''

WHEELS = '''# Packages that Kaggle's image lacks, installed offline from the attached dataset
# {dataset!r} (see README: "Packages Kaggle lacks").
import glob, subprocess, sys
_wheel_dirs = sorted(glob.glob("/kaggle/input/**/{slug}", recursive=True)) or sorted(glob.glob("/kaggle/input/{slug}*"))
if _wheel_dirs:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", _wheel_dirs[0],
                    {packages}], check=True)
else:
    print("wheels dataset {dataset} not attached; using the packages the image has")'''


IMPORT_CHECK = '''import importlib
importlib.invalidate_caches()  # see the files written above
import fwi_core
assert fwi_core.__file__.startswith(_FWI_VENDOR), fwi_core.__file__'''

COLAB_CELL = '''# Colab: the data and the outputs live in a Google Drive folder (the drive_folder parameter)
from pathlib import Path as _Path

from fwi_core.platform import detect_platform as _detect_platform, device_label as _device_label

_drive = _Path(drive_folder).expanduser()
if str(_drive).startswith("{mount}/") and not _drive.is_dir():
    from google.colab import drive as _gdrive     # Colab's own module: asks for access once
    _gdrive.mount("{mount}")
if not _drive.is_dir():
    raise FileNotFoundError(f"drive_folder={{drive_folder!r}}: no such folder; put the competition data in it "
                            "(the folder holding train_samples/ and test/, or the folder above it)")
if globals().get("data_root") is None:
    data_root = str(_drive)                       # the competition root, or the folder holding it
if globals().get("output_dir") in (None, "", "."):
    output_dir = str(_drive / "outputs" / "{kernel}")
if "checkpoint_dirs" in globals():                # the train notebook's outputs on Drive, not Kaggle's inputs
    checkpoint_dirs = [str(_drive / "outputs") if str(d) == "." else d for d in checkpoint_dirs
                       if not str(d).startswith("/kaggle")]
_platform = _detect_platform()
print(_platform.describe(), "|", _device_label(), "| data:", data_root, "| outputs:", output_dir)
if _platform.name == "colab" and not _platform.gpus:
    print("no GPU in this runtime: Runtime > Change runtime type > T4 GPU")'''

ENTRY = '''"""SageMaker entry point, built by `python -m tools.build --target sagemaker` (fwi_core {version},
content hash {digest}): runs fwi_core.train under torchrun across the job's GPUs and hosts.
Flags (the estimator's hyperparameters) go to `python -m fwi_core.train`; see
fwi_core/sagemaker_entry.py."""
import sys

from fwi_core.sagemaker_entry import main

if __name__ == "__main__":
    sys.exit(main())
'''

#: cell metadata of the build's own code cells (bootstrap, modules, import check): source
#: collapsed in JupyterLab/Notebook 7 and on Kaggle; outputs left visible (they are empty
#: unless something fails)
HIDDEN = {"jupyter": {"source_hidden": True}, "_kg_hide-input": True}


def _cell_id(kernel: str, key: str) -> str:
    return hashlib.sha1(f"{kernel}:{key}".encode()).hexdigest()[:12]


def content_hash(modules: Iterable[str], root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for name in sorted(modules):
        h.update(name.encode() + b"\0" + module_path(name, root).read_bytes() + b"\0")
    return h.hexdigest()[:12]


def _read_kernel(kernel: str, root: Path):
    """(jupytext notebook, its text) of ``kernels/<kernel>.py``, syntax checked, with
    exactly one ``parameters`` cell."""
    import jupytext

    src_path = root / "kernels" / f"{kernel}.py"
    if not src_path.is_file():
        raise BuildError(f"{src_path}: no such kernel")
    text = src_path.read_text()
    nb = jupytext.reads(text, fmt="py:percent")
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise BuildError(f"{src_path}: needs exactly one cell tagged 'parameters' (found {len(tagged)})")
    _check_syntax(nb, text, f"kernels/{kernel}.py")
    return nb, text


def _kernel_modules(kernel: str, nb, root: Path) -> List[str]:
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    return resolve_modules(_strip_magics(code), kernel, root)


def module_lines(modules: Iterable[str], root: Path = ROOT) -> int:
    """Total line count of the given fwi_core modules' files (as the notebook carries them)."""
    return sum(len(module_path(name, root).read_text().splitlines()) for name in modules)


def vendored_size(kernel: str, root: Path = ROOT) -> Tuple[int, int]:
    """(number of fwi_core modules, their total line count) that ``kernels/<kernel>.py``
    carries once built: the figures of the build's printed line and of the notebook's
    ``fwi_toolkit`` metadata (``modules``, ``module_lines``)."""
    nb, _ = _read_kernel(kernel, root)
    modules = _kernel_modules(kernel, nb, root)
    return len(modules), module_lines(modules, root)


def _parameters_index(nb) -> int:
    return next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))


def _check_head(nb, head: int, where: str) -> None:
    """The parameters cell and the cells before it run before the bootstrap: none of them
    may import fwi_core."""
    for i, c in enumerate(nb.cells[: head + 1]):
        if c.cell_type != "code":
            continue
        found = _imports_of(_strip_magics(c.source), None, False, where)
        if any(req for req in found.values()):
            what = "the parameters cell" if i == head else "a cell before the parameters cell"
            raise BuildError(f"{where}: cell {i + 1} ({what}) imports {min(n for n, r in found.items() if r)!r}; "
                             f"it runs before {PACKAGE} is inlined: move the import after the parameters cell")


def build_notebook(kernel: str, root: Path = ROOT, target: str = "kaggle", drive_folder: str = DRIVE_FOLDER):
    """(notebook, metadata, module names) for ``kernels/<kernel>.py``; ``target`` "kaggle"
    or "colab" (no Kaggle metadata: None)."""
    import nbformat

    if target not in ("kaggle", "colab"):
        raise BuildError(f"--target {target!r}: a notebook target is kaggle or colab")
    if not (root / "kernels" / f"{kernel}.py").is_file():
        raise BuildError(f"{root / 'kernels' / f'{kernel}.py'}: no such kernel")
    colab = target == "colab"
    meta = {} if colab else load_metadata(kernel, root)     # metadata errors first, as before
    nb, _ = _read_kernel(kernel, root)
    head = _parameters_index(nb)
    _check_head(nb, head, f"kernels/{kernel}.py")
    modules = _kernel_modules(kernel, nb, root)
    version = _version(root)
    digest = content_hash(modules, root)
    lines = module_lines(modules, root)

    def md(key, source):
        return nbformat.v4.new_markdown_cell(source, id=_cell_id(kernel, key))

    def cc(key, source, hidden=False):
        c = nbformat.v4.new_code_cell(source, id=_cell_id(kernel, key))
        if hidden:
            c.metadata.update(copy.deepcopy(HIDDEN))
        return c

    def own(i, c):
        c = copy.deepcopy(c)
        c["id"] = _cell_id(kernel, f"kernel:{i}")
        c.metadata.pop("lines_to_next_cell", None)
        if c.cell_type == "code":
            c.outputs = []
            c.execution_count = None
        return c

    kernel_cells = [own(i, c) for i, c in enumerate(nb.cells)]
    if colab:       # one more parameter: the Drive folder of the data and the outputs
        params = kernel_cells[head]
        params.source = (params.source.rstrip("\n") + f"\ndrive_folder = {drive_folder!r}  # Colab: the Drive folder "
                         "holding the competition data; outputs go to <drive_folder>/outputs/" + kernel)
    cells = kernel_cells[: head + 1]       # the title and the parameters cell come first
    how = "python -m tools.build --target colab" if colab else "python -m tools.build"
    doc = (f"## About this notebook\n\nBuilt by `{how}` from `kernels/{kernel}.py` of the "
           f"fwi-kaggle-toolkit repository; do not edit this notebook, edit the kernel and rebuild.\n\n"
           f"- parameters: the cell above, tagged `parameters` (papermill and Kaggle can override it)\n"
           f"- fwi_core version **{version}**, content hash `{digest}` over {len(modules)} inlined modules "
           f"({lines:,} lines), in the hidden cells below (one per module, titled with its path)\n")
    cells.append(md("about", doc))
    extra = meta.get(TOOLKIT_KEY, {})
    if extra.get("wheels"):
        ds = extra["wheels_dataset"]
        cells.append(cc("wheels", WHEELS.format(dataset=ds, slug=ds.split("/")[-1],
                                                packages=", ".join(repr(p) for p in extra["wheels"]))))
    rels = [module_path(name, root).relative_to(root).as_posix() for name in modules]
    dirs = sorted({r.rsplit("/", 1)[0] for r in rels})
    cells.append(cc("bootstrap", BOOTSTRAP.format(version=version, digest=digest, dirs=dirs, magic=MAGIC),
                    hidden=True))
    for name, rel in zip(modules, rels):
        body = module_path(name, root).read_text() or "# (empty module)\n"  # a cell magic needs a body
        cells.append(cc("mod:" + name, f"%%{MAGIC} {rel}\n" + body, hidden=True))
    cells.append(cc("import-check", IMPORT_CHECK, hidden=True))
    if colab:
        cells.append(cc("colab", COLAB_CELL.format(mount=DRIVE_MOUNT, kernel=kernel)))
    cells.extend(kernel_cells[head + 1:])
    out = nbformat.v4.new_notebook(cells=cells)
    out.nbformat_minor = 5
    out.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "fwi_toolkit": {"kernel": kernel, "fwi_core_version": version, "content_hash": digest,
                        "modules": modules, "module_lines": lines},
    }
    if colab:      # Colab opens it with a GPU runtime
        out.metadata["fwi_toolkit"]["target"] = "colab"
        out.metadata["accelerator"] = "GPU"
        out.metadata["colab"] = {"provenance": [], "gpuType": "T4", "toc_visible": True}
    nbformat.validate(out)
    kaggle_meta = None if colab else {k: v for k, v in meta.items() if k != TOOLKIT_KEY}
    return out, kaggle_meta, modules


def _check_syntax(nb, text: str, where: str) -> None:
    """Raise BuildError naming the cell and line (in the cell and in the kernel file) of
    the first code cell that is not valid Python (magics and shell lines excepted)."""
    lines = text.splitlines()
    markers = [i for i, line in enumerate(lines) if line.startswith("# %%")]
    before = len(nb.cells) - len(markers)          # 1 when the file has cells before its first marker
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code":
            continue
        src = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in c.source.splitlines())
        try:
            ast.parse(src, filename=where)
        except SyntaxError as e:
            start = 0 if i < before else markers[i - before] + 1
            first = c.source.splitlines()[0] if c.source else ""
            start = next((j for j in range(start, len(lines)) if lines[j] == first), start)
            line = f"line {start + e.lineno} of the file, " if e.lineno else ""
            raise BuildError(f"{where}: syntax error in cell {i + 1} ({line}line {e.lineno} of the cell): "
                             f"{e.msg}\n    {(e.text or '').strip()}") from e


def _strip_magics(code: str) -> str:
    return "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))


def _version(root: Path) -> str:
    m = re.search(r'__version__\s*=\s*"([^"]+)"', (root / PACKAGE / "__init__.py").read_text())
    return m.group(1) if m else "unknown"


def build(kernels: Optional[List[str]] = None, out: Optional[Path] = None, root: Path = ROOT,
          target: str = "kaggle", drive_folder: str = DRIVE_FOLDER,
          requirements: Sequence[str] = ()) -> List[Path]:
    """Build the given kernels (default: every ``kernels/*.py``) for ``target``; returns
    notebook paths (for ``sagemaker``: the entry point of the source folder). ``out``
    defaults to :data:`DEFAULT_OUT` of the target."""
    import nbformat

    from fwi_core.utils import atomic_write_text, remove_stale_temps

    if target not in TARGETS:
        raise BuildError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    out = Path(out) if out is not None else DEFAULT_OUT[target]
    if target == "sagemaker":
        if kernels:
            raise BuildError("--target sagemaker builds a source folder, not kernels: drop the kernel names")
        return [build_sagemaker(out, root, requirements)]
    names = kernels or sorted(p.stem for p in (root / "kernels").glob("*.py"))
    if not names:
        raise BuildError(f"{root / 'kernels'}: no kernels to build")
    # every kernel first, then the files: a failing kernel leaves the whole previous build as it was
    built = [(k, *build_notebook(k, root, target, drive_folder)) for k in names]
    written = []
    for k, nb, meta, modules in built:
        d = Path(out) / k
        remove_stale_temps(d)      # what a killed build left half-written
        atomic_write_text(d / f"{k}.ipynb", nbformat.writes(nb) + "\n")
        if meta is not None:
            atomic_write_text(d / "kernel-metadata.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
        written.append(d / f"{k}.ipynb")
        print(f"built {d / (k + '.ipynb')} ({len(modules)} fwi_core modules, "
              f"{nb.metadata[TOOLKIT_KEY]['module_lines']:,} lines, {len(nb.cells)} cells)")
    return written


def build_sagemaker(out: Path, root: Path = ROOT, requirements: Sequence[str] = ()) -> Path:
    """The SageMaker source folder ``out`` (see the module doc), built beside it and
    swapped into place; returns its entry point ``out/train_entry.py``."""
    from fwi_core.utils import locked_staging_dir, remove_stale_temps

    out = Path(out)
    modules = resolve_modules(f"import {SAGEMAKER_MODULE}\n", "sagemaker", root)
    bad = [r for r in requirements if not re.fullmatch(r"[A-Za-z0-9_.\-\[\],<>=!~ ]+", r)]
    if bad:
        raise BuildError(f"--requirements {bad}: expected pip requirement specifiers such as timm==1.0.31")
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} is a file, expected a folder")
    digest = content_hash(modules, root)
    info = {"target": "sagemaker", "entry_point": "train_entry.py", "fwi_core_version": _version(root),
            "content_hash": digest, "modules": modules, "module_lines": module_lines(modules, root),
            "requirements": list(requirements)}
    old = out.with_name(f".{out.name}.old")
    if old.is_dir():               # a build killed between the two renames below
        if out.exists():
            shutil.rmtree(old)
        else:
            old.rename(out)
    remove_stale_temps(out.parent, out.name)
    with locked_staging_dir(out) as tmp:
        for name in modules:
            src = module_path(name, root)
            dst = tmp / src.relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
        (tmp / "train_entry.py").write_text(ENTRY.format(version=info["fwi_core_version"], digest=digest))
        (tmp / "build-info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if requirements:
            (tmp / "requirements.txt").write_text("".join(r + "\n" for r in requirements))
        if out.exists():
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    print(f"built {out} (SageMaker source folder: train_entry.py + {len(modules)} fwi_core modules, "
          f"{info['module_lines']:,} lines)")
    return out / "train_entry.py"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.build",
                                 description="Build self-contained notebooks (Kaggle, Colab) or a SageMaker source folder.")
    ap.add_argument("kernels", nargs="*", help="kernel names (default: all in kernels/)")
    ap.add_argument("--target", choices=TARGETS, default="kaggle", help="where it runs (default: kaggle)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: build/, build/colab/ or build/sagemaker/ by target)")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository to build from (default: this checkout)")
    ap.add_argument("--drive-folder", default=DRIVE_FOLDER,
                    help=f"colab: the drive_folder parameter's default (default: {DRIVE_FOLDER})")
    ap.add_argument("--requirements", nargs="*", default=[],
                    help="sagemaker: packages for requirements.txt (e.g. timm==1.0.31)")
    a = ap.parse_args(argv)
    try:
        build(a.kernels or None, a.out, a.root, a.target, a.drive_folder, a.requirements)
    except BuildError as e:
        print(f"build failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
