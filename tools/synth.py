"""Generate a synthetic dataset in exactly the competition's layout.

    python -m tools.synth --out DIR --samples-per-family N --test-samples M --seed S [--force] [--device cuda]

Writes ``DIR/train_samples/<Family>/...`` (``data/dataK.npy`` + ``model/modelK.npy`` for
Vel/Style families, ``seisK_1_0.npy`` + ``velK_1_0.npy`` for Fault families), ``DIR/test/<oid>.npy``
(10-hex-digit oids), ``DIR/sample_submission.csv`` and, outside ``test/``, the true test
velocities in ``DIR/test_solution.npz`` (arrays ``oids``, ``velocity``, ``family``) so local
runs can be scored. Seismic comes from :func:`fwi_core.physics.simulate`, the exact
replica of the host's simulator, on maps from :mod:`fwi_core.physics.families`, on
``--device`` (default: CUDA when available, else CPU); the command prints the simulation
throughput (samples per second).

The dataset is built in a staging folder beside ``DIR`` and renamed into place at the
end, so an interrupted run leaves nothing half-written: ``DIR`` holds the previous dataset
or the new one, complete, and the next run removes a killed run's staging folder (and puts
the previous dataset back if the kill came between the two renames of the swap).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from fwi_core.data.submission import HEADER, N_ROWS
from fwi_core.physics import FAMILIES, FAULT_FAMILIES, generate, simulate
from fwi_core.utils import atomic_save_npy, locked_staging_dir, progress_bar, remove_stale_temps

MAX_PER_FILE = 500  # the competition's files hold 500 samples


class SynthError(ValueError):
    """Bad arguments for a synthetic dataset (the message names the option)."""


def _file_names(family: str, k: int):
    """(seismic, velocity) relative paths of the k-th file of a family."""
    if family in FAULT_FAMILIES:
        num = (2 if family.endswith("_A") else 6) + 2 * k
        return Path(f"seis{num}_1_0.npy"), Path(f"vel{num}_1_0.npy")
    return Path("data") / f"data{k + 1}.npy", Path("model") / f"model{k + 1}.npy"


def resolve_device(device: Optional[str]) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SynthError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev


def _simulate(vel: np.ndarray, bar, backend: str, device: torch.device, stats: Dict[str, float]) -> np.ndarray:
    out = np.empty((len(vel), 5, 1000, 70), np.float32)
    step = 256 if device.type == "cuda" else 8
    t = time.perf_counter()
    for i in range(0, len(vel), step):
        out[i:i + step] = simulate(vel[i:i + step], backend=backend, device=device)
        bar.update(len(vel[i:i + step]))
    stats["simulate_s"] = stats.get("simulate_s", 0.0) + time.perf_counter() - t
    stats["samples"] = stats.get("samples", 0) + len(vel)
    return out


def _old(out: Path) -> Path:
    return out.with_name(f".{out.name}.old")


def _recover(out: Path) -> None:
    """Repair what a killed run left beside ``out``: the previous dataset moved aside but
    not yet replaced goes back into place; a moved-aside copy that was being deleted, and
    staging folders of dead runs, are removed."""
    old = _old(out)
    if old.is_dir():
        if not out.exists():
            old.rename(out)
        else:
            shutil.rmtree(old)
    remove_stale_temps(out.parent, out.name)


def build(out: Path, samples_per_family: int, test_samples: int, seed: int = 0,
          families: Optional[List[str]] = None, samples_per_file: int = MAX_PER_FILE,
          force: bool = False, backend: str = "auto", device: Optional[str] = None,
          stats: Optional[Dict[str, float]] = None) -> Path:
    """Build the dataset at ``out``; returns ``out``. See the module docstring.

    ``stats``, when given, receives ``samples`` (simulated), ``simulate_s`` (seconds spent
    simulating) and ``device``.
    """
    out = Path(out)
    families = list(families or FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SynthError(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    for flag, value, low in (("--samples-per-family", samples_per_family, 1), ("--test-samples", test_samples, 0),
                             ("--samples-per-file", samples_per_file, 1), ("--seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SynthError(f"{flag} must be >= {low}, got {value!r}")
    if backend not in ("auto", "compile", "eager"):
        raise SynthError(f"--backend must be auto, compile or eager, got {backend!r}")
    if out.exists() and not out.is_dir():
        raise SynthError(f"--out {out} is a file, expected a folder")
    dev = resolve_device(device)
    stats = {} if stats is None else stats
    stats["device"] = str(dev)
    _recover(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise SynthError(f"{out} exists and is not empty; pass --force to replace it")
    with locked_staging_dir(out) as tmp:
        rng = np.random.default_rng(seed)
        total = len(families) * samples_per_family + test_samples
        bar = progress_bar(total=total, desc="synth", unit="sample")
        for fi, fam in enumerate(families):
            vel = generate(fam, samples_per_family, seed=seed)
            for k, s0 in enumerate(range(0, samples_per_family, samples_per_file)):
                v = vel[s0:s0 + samples_per_file]
                seis_rel, vel_rel = _file_names(fam, k)
                atomic_save_npy(tmp / "train_samples" / fam / seis_rel, _simulate(v, bar, backend, dev, stats))
                atomic_save_npy(tmp / "train_samples" / fam / vel_rel, v)
        # test set: families dealt round-robin, oids 10 hex digits, sorted like Kaggle's listing
        test_dir = tmp / "test"
        test_dir.mkdir(parents=True, exist_ok=True)
        oids: List[str] = []
        seen = set()
        while len(oids) < test_samples:
            oid = "".join(rng.choice(list("0123456789abcdef"), 10))
            if oid not in seen:
                seen.add(oid)
                oids.append(oid)
        fams = [families[i % len(families)] for i in range(test_samples)]
        tvel = np.zeros((test_samples, 1, 70, 70), np.float32)
        for fam in sorted(set(fams)):
            ix = [i for i, f in enumerate(fams) if f == fam]
            tvel[ix] = generate(fam, len(ix), seed=seed + 1_000_003)
        tseis = _simulate(tvel, bar, backend, dev, stats) if test_samples else np.zeros((0, 5, 1000, 70), np.float32)
        for oid, s in zip(oids, tseis):
            atomic_save_npy(test_dir / f"{oid}.npy", s)
        bar.close()
        np.savez(tmp / "test_solution.npz", oids=np.array(oids), velocity=tvel, family=np.array(fams))
        with open(tmp / "sample_submission.csv", "w") as fh:
            fh.write(",".join(HEADER) + "\n")
            vals = ",".join(["3000.0"] * (len(HEADER) - 1))
            for oid in sorted(oids):
                for r in range(N_ROWS):
                    fh.write(f"{oid}_y_{r},{vals}\n")
        # swap into place (a kill between the two renames is repaired by the next run's _recover)
        if out.exists():
            old = _old(out)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="dataset root to create")
    ap.add_argument("--samples-per-family", type=int, default=8)
    ap.add_argument("--test-samples", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", nargs="*", default=None, help=f"subset of {' '.join(FAMILIES)}")
    ap.add_argument("--samples-per-file", type=int, default=MAX_PER_FILE)
    ap.add_argument("--backend", choices=["auto", "compile", "eager"], default="auto",
                    help="simulator backend (see fwi_core.physics.simulate)")
    ap.add_argument("--device", default="auto",
                    help="where to simulate: cpu, cuda, cuda:N or auto (default: cuda when available)")
    ap.add_argument("--force", action="store_true", help="replace an existing dataset at --out")
    a = ap.parse_args(argv)
    stats: Dict[str, float] = {}
    try:
        build(a.out, a.samples_per_family, a.test_samples, a.seed, a.families, a.samples_per_file, a.force,
              a.backend, a.device, stats)
    except SynthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out} ({len(a.families or FAMILIES)} families x {a.samples_per_family} train samples, "
          f"{a.test_samples} test samples)")
    sps = stats["samples"] / stats["simulate_s"] if stats.get("simulate_s") else float("nan")
    print(f"simulated {stats.get('samples', 0)} samples (5 shots x 1000 steps) on {stats['device']} in "
          f"{stats.get('simulate_s', 0.0):.1f} s: {sps:.2f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
