"""The SageMaker training entry point: ``python -m fwi_core.sagemaker_entry [train flags]``.

``python -m tools.build --target sagemaker`` writes a source folder whose ``train_entry.py``
calls :func:`main`; ``python -m tools.sagemaker_job`` submits it. Everything comes from
SageMaker's environment:

- the data: ``--data`` defaults to the ``training`` channel (``SM_CHANNEL_TRAINING``, else
  the only channel);
- the run folder: ``--out`` defaults to ``<checkpoint dir>/run`` when the job has a
  checkpoint folder (``/opt/ml/checkpoints``, synced to S3 by the estimator's
  ``checkpoint_s3_uri``; ``FWI_CHECKPOINT_DIR`` moves it), resumed automatically when a
  spot instance comes back, else ``SM_MODEL_DIR/run``. At the end rank 0 copies the run
  without its resumable ``ckpt-*.pt`` files to ``SM_MODEL_DIR/run`` (uploaded as the
  model artifact);
- the processes: one per GPU (``SM_NUM_GPUS``; ``--nproc-per-node N`` on CPU instances
  or to use fewer) on every host of ``SM_HOSTS``; this host's rank is the position of
  ``SM_CURRENT_HOST`` in it, the first host the rendezvous (``MASTER_ADDR`` /
  ``MASTER_PORT`` override it).

Started by SageMaker's ``torch_distributed`` launcher (torchrun already running:
``WORLD_SIZE`` set) the entry point trains in this process; started as a plain script on
several processes' worth of GPUs or hosts it launches ``torchrun`` itself, with this
module as the script, so both ways run :mod:`fwi_core.train` under DDP (NCCL on GPUs,
gloo on CPU). Every other flag (``--model``, ``--epochs``, the estimator's
hyperparameters) goes to ``python -m fwi_core.train`` unchanged.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from fwi_core.errors import ConfigError, FWIError
from fwi_core.models.checkpoint import rolling_checkpoints
from fwi_core.platform import sagemaker_channels, sagemaker_hosts
from fwi_core.train import cli as train_cli

#: SageMaker's checkpoint folder (the estimator's ``checkpoint_local_path`` default)
CHECKPOINT_DIR = "/opt/ml/checkpoints"
DEFAULT_PORT = 29500
PACKAGE_PARENT = str(Path(__file__).resolve().parents[1])


@dataclass
class SageMakerJob:
    """What SageMaker's environment says about this job (see the module doc)."""

    hosts: Tuple[str, ...]
    current_host: Optional[str]
    gpus: int
    channels: Dict[str, str]
    model_dir: str
    output_dir: Optional[str]
    checkpoint_dir: Optional[str]
    env: Mapping[str, str] = field(repr=False, default_factory=dict)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "SageMakerJob":
        env = os.environ if env is None else env
        if "SM_MODEL_DIR" not in env:
            raise ConfigError("SM_MODEL_DIR is not set: this is not a SageMaker training job (the entry point "
                              "reads SM_MODEL_DIR, SM_CHANNEL_*, SM_HOSTS, SM_CURRENT_HOST, SM_NUM_GPUS)")
        hosts, current = sagemaker_hosts(env)
        hosts = hosts or (current or "algo-1",)         # no SM_HOSTS: one host, this one
        gpus_raw = env.get("SM_NUM_GPUS", "0") or "0"
        if not gpus_raw.isdigit():
            raise ConfigError(f"environment variable SM_NUM_GPUS={gpus_raw!r}: expected an integer")
        ckpt = env.get("FWI_CHECKPOINT_DIR", CHECKPOINT_DIR)
        return cls(hosts, current or hosts[0], int(gpus_raw), sagemaker_channels(env), env["SM_MODEL_DIR"],
                   env.get("SM_OUTPUT_DATA_DIR"), ckpt if ckpt and Path(ckpt).is_dir() else None, env)

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host)

    def data_dir(self) -> str:
        """The ``training`` channel, else the only channel."""
        if "training" in self.channels:
            return self.channels["training"]
        if len(self.channels) == 1:
            return next(iter(self.channels.values()))
        raise ConfigError(f"no 'training' channel among {sorted(self.channels) or 'no channels'}: name the data "
                          "channel 'training' in fit(inputs={'training': 's3://...'}) or pass --data")

    def run_dir(self) -> Path:
        return Path(self.checkpoint_dir or self.model_dir) / "run"

    def nproc_per_node(self, requested: Optional[int]) -> int:
        if requested is not None:
            if requested < 1:
                raise ConfigError(f"--nproc-per-node must be >= 1, got {requested}")
            if self.gpus and requested > self.gpus:
                raise ConfigError(f"--nproc-per-node {requested}: this instance has {self.gpus} GPUs")
            return requested
        return max(1, self.gpus)

    def torchrun_command(self, nproc: int, train_args: Sequence[str]) -> List[str]:
        """The ``torchrun`` command that runs this module on ``nproc`` processes per host."""
        addr = self.env.get("MASTER_ADDR") or (self.hosts[0] if len(self.hosts) > 1 else "127.0.0.1")
        port = self.env.get("MASTER_PORT") or str(DEFAULT_PORT)
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(self.hosts)),
                "--node-rank", str(self.node_rank), "--nproc-per-node", str(nproc), "--master-addr", addr,
                "--master-port", port, "-m", "fwi_core.sagemaker_entry", *train_args]


def _given(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _bare_flags(args: Sequence[str]) -> List[str]:
    """SageMaker passes a hyperparameter without a value (a switch such as
    ``--no-balance-families``) as ``--flag ""``: drop the empty value."""
    return [a for i, a in enumerate(args) if not (a == "" and i > 0 and args[i - 1].startswith("--"))]


def train_arguments(job: SageMakerJob, args: Sequence[str]) -> List[str]:
    """The ``python -m fwi_core.train`` flags: ``args`` (switches' empty values dropped)
    plus ``--data``, ``--out`` and ``--resume`` where SageMaker's environment decides them."""
    out = _bare_flags(list(args))
    if not _given(out, "--data"):
        out += ["--data", job.data_dir()]
    if not _given(out, "--out"):
        run = job.run_dir()
        out += ["--out", str(run)]
        if rolling_checkpoints(run) and not _given(out, "--resume"):
            out += ["--resume", "auto"]       # a spot instance came back: go on from the checkpoint
    return out


def _out_of(args: Sequence[str]) -> Optional[Path]:
    for i, a in enumerate(args):
        if a == "--out" and i + 1 < len(args):
            return Path(args[i + 1])
        if a.startswith("--out="):
            return Path(a.split("=", 1)[1])
    return None


def publish(run: Optional[Path], model_dir: Path) -> Optional[Path]:
    """Copy a finished run folder, without its resumable ``ckpt-*.pt``, to
    ``model_dir/<run name>`` (what SageMaker uploads); None when ``run`` is already there."""
    if run is None:
        return None
    run, target = Path(run), Path(model_dir) / Path(run).name
    if not run.is_dir() or run.resolve() == target.resolve():
        return None
    skip = {p.name for p in rolling_checkpoints(run)}
    target.mkdir(parents=True, exist_ok=True)
    for p in sorted(run.iterdir()):
        if p.is_file() and p.name not in skip and not p.name.startswith("."):
            shutil.copy2(p, target / p.name)
    return target


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fwi_core.sagemaker_entry", add_help=True,
                                 description="SageMaker entry point: fwi_core.train under torchrun across the "
                                             "job's GPUs and hosts; other flags go to python -m fwi_core.train.")
    ap.add_argument("--nproc-per-node", type=int, default=None,
                    help="processes per host (default: SM_NUM_GPUS, 1 on CPU instances)")
    return ap


def main(argv: Optional[List[str]] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    env = os.environ if environ is None else environ
    own, rest = _parser().parse_known_args(argv)
    try:
        job = SageMakerJob.from_env(env)
        nproc = job.nproc_per_node(own.nproc_per_node)
        args = train_arguments(job, rest)
    except FWIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "WORLD_SIZE" not in env and nproc * len(job.hosts) > 1:
        cmd = job.torchrun_command(nproc, args)
        child = dict(env)
        child["PYTHONPATH"] = os.pathsep.join([PACKAGE_PARENT] + [p for p in [env.get("PYTHONPATH")] if p])
        print("launching:", " ".join(cmd), flush=True)
        return subprocess.run(cmd, env=child, check=False).returncode
    code = train_cli.main(args)
    if code == 0 and env.get("RANK", "0") == "0":
        published = publish(_out_of(args), Path(job.model_dir))
        if published is not None:
            print(f"copied the run to {published}")
    return code


if __name__ == "__main__":
    sys.exit(main())
