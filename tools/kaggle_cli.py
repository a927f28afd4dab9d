"""Push built kernels with the real Kaggle CLI, and read their status and output.

    python -m tools.kaggle_cli push KERNEL      # build, then `kaggle kernels push -p build/KERNEL`
    python -m tools.kaggle_cli status KERNEL    # `kaggle kernels status <id>`
    python -m tools.kaggle_cli output KERNEL [--dest DIR]   # `kaggle kernels output <id> -p DIR`

The CLI runs as a subprocess (``import kaggle`` authenticates at import time and prints a
long message without credentials); credentials are checked first, so a missing token is
one clear line instead of a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]


class KaggleCLIError(Exception):
    """The push cannot happen (no credentials, no CLI, not built)."""


def credentials_source(env=None) -> Optional[str]:
    """Where the Kaggle CLI would find credentials, or None (FACTS section 4)."""
    env = os.environ if env is None else env
    if env.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME + KAGGLE_KEY"
    home = Path(env.get("HOME", str(Path.home())))
    config_dir = Path(env["KAGGLE_CONFIG_DIR"]) if env.get("KAGGLE_CONFIG_DIR") else home / ".kaggle"
    for name in ("access_token", "kaggle.json"):
        if (config_dir / name).is_file():
            return str(config_dir / name)
    return None


def _kaggle_exe() -> str:
    beside = Path(sys.executable).with_name("kaggle")  # the venv's own CLI
    exe = str(beside) if beside.exists() else shutil.which("kaggle")
    if not exe:
        raise KaggleCLIError("the kaggle CLI is not installed: run `make venv` (or pip install kaggle six)")
    return exe


def _require_credentials() -> None:
    if credentials_source() is None:
        raise KaggleCLIError(
            "no Kaggle credentials: set KAGGLE_API_TOKEN (or KAGGLE_USERNAME and KAGGLE_KEY), or save "
            "your token to ~/.kaggle/access_token (or kaggle.json; KAGGLE_CONFIG_DIR moves the folder). "
            "Create one at kaggle.com > Settings > API.")


def kernel_id(kernel: str, build_dir: Path = ROOT / "build") -> str:
    meta = build_dir / kernel / "kernel-metadata.json"
    if not meta.is_file():
        raise KaggleCLIError(f"{meta} does not exist: run `make build` first")
    return personalise(meta)


def run_cli(args: List[str]) -> int:
    """Run ``kaggle ARGS`` and return its exit code (its output goes to ours)."""
    _require_credentials()
    cmd = [_kaggle_exe()] + args
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


#: the user name the shipped kernel-metadata files carry until you put yours there
TEMPLATE_USER = "your-kaggle-username"


def personalise(meta_path: Path, env=None) -> str:
    """Replace the template user name in a built kernel-metadata.json (its ``id`` and
    ``kernel_sources``) with ``KAGGLE_USERNAME``; returns the kernel id. Raises
    KaggleCLIError when the template is still there and no user name is known."""
    env = os.environ if env is None else env
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KaggleCLIError(f"{meta_path}: not valid JSON ({e}); rebuild it with `make build`") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("id"), str):
        raise KaggleCLIError(f"{meta_path}: no 'id' (expected \"user/slug\"); rebuild it with `make build`")
    if not meta["id"].startswith(TEMPLATE_USER + "/"):
        return meta["id"]
    user = env.get("KAGGLE_USERNAME")
    if not user:
        raise KaggleCLIError(f"{meta_path.name}: the kernel id is still {meta['id']!r}; write your Kaggle user "
                             f"name into kernel-metadata/*.json or set KAGGLE_USERNAME")

    def swap(ref: str) -> str:
        return user + ref[len(TEMPLATE_USER):] if ref.startswith(TEMPLATE_USER + "/") else ref

    meta["id"] = swap(meta["id"])
    meta["kernel_sources"] = [swap(r) for r in meta.get("kernel_sources", [])]
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta["id"]


def push(kernel: str, build_dir: Path = ROOT / "build", accelerator: Optional[str] = None,
         root: Path = ROOT) -> int:
    """Build ``kernel`` from ``root`` into ``build_dir`` and push it; returns the CLI's exit code."""
    from tools.build import build

    _require_credentials()
    build([kernel], build_dir, root)
    print("kernel id:", personalise(build_dir / kernel / "kernel-metadata.json"))
    args = ["kernels", "push", "-p", str(build_dir / kernel)]
    if accelerator:
        args += ["--accelerator", accelerator]
    return run_cli(args)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.kaggle_cli", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("push", help="build and push a kernel")
    p.add_argument("kernel")
    p.add_argument("--accelerator", help="e.g. NvidiaTeslaT4 (overrides machine_shape)")
    s = sub.add_parser("status", help="status of the kernel's latest version")
    s.add_argument("kernel")
    o = sub.add_parser("output", help="download the kernel's output files")
    o.add_argument("kernel")
    o.add_argument("--dest", default=None, help="folder (default: outputs/<kernel>)")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "push":
            return push(a.kernel, accelerator=a.accelerator)
        if a.cmd == "status":
            return run_cli(["kernels", "status", kernel_id(a.kernel)])
        dest = a.dest or str(ROOT / "outputs" / a.kernel)
        Path(dest).mkdir(parents=True, exist_ok=True)
        return run_cli(["kernels", "output", kernel_id(a.kernel), "-p", dest])
    except KaggleCLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a build failure: one clear line
        from tools.build import BuildError

        if isinstance(e, BuildError):
            print(f"build failed: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
