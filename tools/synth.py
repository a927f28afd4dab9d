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

Under torchrun the ranks share the simulation (:mod:`fwi_core.sharding`):

    torchrun --nproc-per-node 8 -m tools.synth --out DIR --samples-per-family 5000 --test-samples 2000

The work is cut into the batches a single process would simulate (``--samples-per-file``
files in chunks of 8 maps on the CPU, 256 on a GPU; the test maps likewise), dealt largest
first to the least-loaded rank; each rank simulates on ``cuda:<LOCAL_RANK>`` (or the CPU)
and saves its chunks in ``.<DIR name>.synth-shards/`` beside ``DIR``; rank 0 collects them
(over the process group from ranks on other machines) and assembles the dataset, byte for
byte the one a single process writes, then swaps it into place as above. A killed rank
loses only its chunk in progress: the same command resumes (chunks already saved are kept,
whatever the number of ranks).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from fwi_core.data.submission import HEADER, N_ROWS
from fwi_core.errors import FWIError
from fwi_core.physics import FAMILIES, FAULT_FAMILIES, generate, simulate
from fwi_core.sharding import Coordinator, Ranks, deal
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


def _step(device: torch.device) -> int:
    """Maps simulated per call (the batches that the sharded run reproduces exactly)."""
    return 256 if device.type == "cuda" else 8


def _simulate(vel: np.ndarray, bar, backend: str, device: torch.device, stats: Dict[str, float]) -> np.ndarray:
    out = np.empty((len(vel), 5, 1000, 70), np.float32)
    step = _step(device)
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


def _test_plan(families: List[str], test_samples: int, seed: int) -> Tuple[List[str], List[str], np.ndarray]:
    """(oids, families, velocities) of the test set: families dealt round-robin, oids 10
    hex digits."""
    rng = np.random.default_rng(seed)
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
    return oids, fams, tvel


def _write_test_extras(tmp: Path, oids: List[str], fams: List[str], tvel: np.ndarray) -> None:
    np.savez(tmp / "test_solution.npz", oids=np.array(oids), velocity=tvel, family=np.array(fams))
    with open(tmp / "sample_submission.csv", "w") as fh:
        fh.write(",".join(HEADER) + "\n")
        vals = ",".join(["3000.0"] * (len(HEADER) - 1))
        for oid in sorted(oids):
            for r in range(N_ROWS):
                fh.write(f"{oid}_y_{r},{vals}\n")


def _swap(tmp: Path, out: Path) -> None:
    """Rename the finished staging folder into place (a kill between the two renames is
    repaired by the next run's _recover)."""
    if out.exists():
        old = _old(out)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def _check_args(out: Path, samples_per_family: int, test_samples: int, seed: int, families: List[str],
                samples_per_file: int, backend: str) -> None:
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


def build(out: Path, samples_per_family: int, test_samples: int, seed: int = 0,
          families: Optional[List[str]] = None, samples_per_file: int = MAX_PER_FILE,
          force: bool = False, backend: str = "auto", device: Optional[str] = None,
          stats: Optional[Dict[str, float]] = None, ranks: Optional[Ranks] = None) -> Path:
    """Build the dataset at ``out``; returns ``out``. See the module docstring.

    ``stats``, when given, receives ``samples`` (simulated by this process),
    ``simulate_s`` (seconds spent simulating) and ``device``. ``ranks`` (default: from
    torchrun's variables) shares the work over the ranks of a torchrun job.
    """
    ranks = ranks if ranks is not None else Ranks.from_env()
    if ranks.enabled:
        return _build_sharded(Path(out), samples_per_family, test_samples, seed, list(families or FAMILIES),
                              samples_per_file, force, backend, device, {} if stats is None else stats, ranks)
    out = Path(out)
    families = list(families or FAMILIES)
    _check_args(out, samples_per_family, test_samples, seed, families, samples_per_file, backend)
    dev = resolve_device(device)
    stats = {} if stats is None else stats
    stats["device"] = str(dev)
    _recover(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise SynthError(f"{out} exists and is not empty; pass --force to replace it")
    with locked_staging_dir(out) as tmp:
        total = len(families) * samples_per_family + test_samples
        bar = progress_bar(total=total, desc="synth", unit="sample")
        for fi, fam in enumerate(families):
            vel = generate(fam, samples_per_family, seed=seed)
            for k, s0 in enumerate(range(0, samples_per_family, samples_per_file)):
                v = vel[s0:s0 + samples_per_file]
                seis_rel, vel_rel = _file_names(fam, k)
                atomic_save_npy(tmp / "train_samples" / fam / seis_rel, _simulate(v, bar, backend, dev, stats))
                atomic_save_npy(tmp / "train_samples" / fam / vel_rel, v)
        # test set: families dealt round-robin, oids 10 hex digits
        test_dir = tmp / "test"
        test_dir.mkdir(parents=True, exist_ok=True)
        oids, fams, tvel = _test_plan(families, test_samples, seed)
        tseis = _simulate(tvel, bar, backend, dev, stats) if test_samples else np.zeros((0, 5, 1000, 70), np.float32)
        for oid, s in zip(oids, tseis):
            atomic_save_npy(test_dir / f"{oid}.npy", s)
        bar.close()
        _write_test_extras(tmp, oids, fams, tvel)
        _swap(tmp, out)
    return out


# --------------------------------------------------------------------------- torchrun
def _units(families: List[str], samples_per_family: int, samples_per_file: int, test_samples: int,
           step: int) -> List[Tuple[str, int, int, int]]:
    """The work, in the single process's batches: ``(family, file k, start, stop)`` rows
    of a family's maps (file-relative start = start - k * samples_per_file), then
    ``("test", -1, start, stop)``."""
    units = []
    for fam in families:
        for k, s0 in enumerate(range(0, samples_per_family, samples_per_file)):
            s1 = min(samples_per_family, s0 + samples_per_file)
            units += [(fam, k, a, min(s1, a + step)) for a in range(s0, s1, step)]
    units += [("test", -1, a, min(test_samples, a + step)) for a in range(0, test_samples, step)]
    return units


def _build_sharded(out: Path, samples_per_family: int, test_samples: int, seed: int, families: List[str],
                   samples_per_file: int, force: bool, backend: str, device: Optional[str],
                   stats: Dict[str, float], ranks: Ranks) -> Path:
    _check_args(out, samples_per_family, test_samples, seed, families, samples_per_file, backend)
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(ranks.device(None) or "cuda")
    stats["device"] = str(dev)
    coord = Coordinator(ranks)
    try:
        verdict = None
        if ranks.is_main:      # rank 0 owns the output folder
            _recover(out)
            if out.exists() and any(out.iterdir()) and not force:
                verdict = f"{out} exists and is not empty; pass --force to replace it"
        step = _step(dev)
        plan = {"seed": seed, "families": families, "samples_per_family": samples_per_family,
                "samples_per_file": samples_per_file, "test_samples": test_samples, "step": step,
                "backend": backend}
        shared = coord.all_gather((verdict, plan))
        if shared[0][0]:
            raise SynthError(shared[0][0])
        if any(p != shared[0][1] for _, p in shared):
            raise SynthError("the ranks disagree on the dataset (different arguments or devices); give every rank "
                             "the same command and devices of one kind")
        key = hashlib.sha1(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:12]
        shards = out.parent / f".{out.name}.synth-shards"
        (shards / "parts").mkdir(parents=True, exist_ok=True)
        units = _units(families, samples_per_family, samples_per_file, test_samples, step)
        mine = deal([u[3] - u[2] for u in units], ranks.world, ranks.rank)
        parts = [shards / "parts" / f"{key}-u{i:06d}.npy" for i in range(len(units))]
        todo = [i for i in mine if not parts[i].is_file()]       # saved chunks of a killed run are kept
        bar = progress_bar(total=sum(units[i][3] - units[i][2] for i in todo), desc=f"synth rank {ranks.rank}",
                           unit="sample")
        vel: Dict[str, np.ndarray] = {}
        for i in todo:
            fam, _, a, b = units[i]
            if fam not in vel:
                vel[fam] = (_test_plan(families, test_samples, seed)[2] if fam == "test"
                            else generate(fam, samples_per_family, seed=seed))
            atomic_save_npy(parts[i], _simulate(vel[fam][a:b], bar, backend, dev, stats))
        bar.close()
        stats.setdefault("samples", 0)
        coord.collect([parts[i] for i in mine])
        if ranks.is_main:
            _assemble(out, units, parts, families, samples_per_family, samples_per_file, test_samples, seed)
            shutil.rmtree(shards, ignore_errors=True)
        coord.barrier()
        if not ranks.is_main:
            shutil.rmtree(shards, ignore_errors=True)     # this machine's copy, when it has its own disk
    finally:
        coord.close()
    return out


def _assemble(out: Path, units, parts: List[Path], families: List[str], samples_per_family: int,
              samples_per_file: int, test_samples: int, seed: int) -> None:
    """Rank 0: the dataset from the saved chunks, in a staging folder swapped into place."""
    with locked_staging_dir(out) as tmp:
        for fam in families:
            vel = generate(fam, samples_per_family, seed=seed)
            for k, s0 in enumerate(range(0, samples_per_family, samples_per_file)):
                seis = np.concatenate([np.load(parts[i]) for i, u in enumerate(units) if u[:2] == (fam, k)])
                seis_rel, vel_rel = _file_names(fam, k)
                atomic_save_npy(tmp / "train_samples" / fam / seis_rel, seis)
                atomic_save_npy(tmp / "train_samples" / fam / vel_rel, vel[s0:s0 + samples_per_file])
        (tmp / "test").mkdir(parents=True, exist_ok=True)
        oids, fams, tvel = _test_plan(families, test_samples, seed)
        for i, u in enumerate(units):
            if u[0] == "test":
                for oid, s in zip(oids[u[2]:u[3]], np.load(parts[i])):
                    atomic_save_npy(tmp / "test" / f"{oid}.npy", s)
        _write_test_extras(tmp, oids, fams, tvel)
        _swap(tmp, out)


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
    t0 = time.perf_counter()
    try:
        ranks = Ranks.from_env()
        build(a.out, a.samples_per_family, a.test_samples, a.seed, a.families, a.samples_per_file, a.force,
              a.backend, a.device, stats, ranks)
    except (SynthError, FWIError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sps = stats["samples"] / stats["simulate_s"] if stats.get("simulate_s") else float("nan")
    who = f"rank {ranks.rank}/{ranks.world}: " if ranks.enabled else ""
    print(f"{who}simulated {stats.get('samples', 0)} samples (5 shots x 1000 steps) on {stats['device']} in "
          f"{stats.get('simulate_s', 0.0):.1f} s: {sps:.2f} samples/s")
    if ranks.is_main:
        total = len(a.families or FAMILIES) * a.samples_per_family + a.test_samples
        wall = time.perf_counter() - t0
        print(f"wrote {a.out} ({len(a.families or FAMILIES)} families x {a.samples_per_family} train samples, "
              f"{a.test_samples} test samples) in {wall:.1f} s on {ranks.world} process"
              f"{'es' if ranks.world > 1 else ''}: {total / wall:.2f} samples/s overall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
