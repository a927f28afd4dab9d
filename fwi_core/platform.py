"""Where are we running? Kaggle, Colab, SageMaker, a cluster or a local machine.

The platform decides the defaults a run needs when the config leaves them open: where the
data is, where outputs go and how long a session may last, and it says what a run had to
work with (hosts, GPUs, the device), which checkpoints record. Checkpoints have the same
format everywhere.

=========  ===========================================  =======================================
platform   detected by                                  session limit (``time_budget``)
=========  ===========================================  =======================================
kaggle     ``KAGGLE_KERNEL_RUN_TYPE``                   12 h session: 11.5 h
colab      ``COLAB_RELEASE_TAG`` / ``google.colab``     about 12 h (free tier): 11 h
sagemaker  ``SM_MODEL_DIR``, ``SM_CHANNEL_*``, ...      the job's ``max_run`` (none here)
cluster    ``SLURM_JOB_ID``, or torchrun over several   ``SLURM_JOB_END_TIME`` when Slurm sets
           machines (``WORLD_SIZE > LOCAL_WORLD_SIZE``) it, else none
local      anything else                                none
=========  ===========================================  =======================================

``FWI_DATA`` overrides the data folder everywhere; ``FWI_TIME_LIMIT`` (seconds from the
process start) sets or overrides the session limit everywhere.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

from .data.layout import find_competition_root
from .errors import ConfigError, LayoutError
from .utils import has_module

KAGGLE_BUDGET = 11.5 * 3600.0   # 12 h session, minus time to save and upload
COLAB_BUDGET = 11.0 * 3600.0    # sessions last up to about 12 h
PLATFORMS = ("kaggle", "colab", "sagemaker", "cluster", "local")
#: SageMaker's variables that say "this is a training job"
SAGEMAKER_VARS = ("SM_MODEL_DIR", "SM_CHANNEL_TRAINING", "SM_OUTPUT_DATA_DIR", "SM_HOSTS", "SM_CURRENT_HOST")


@dataclass(frozen=True)
class Platform:
    """A detected platform and its defaults.

    Attributes:
        name: "kaggle", "colab", "sagemaker", "cluster" or "local".
        data_dir: default competition root, or None when none was found.
        out_dir: default parent folder of run folders.
        time_budget: default training budget in seconds from the process start, or None
            for no limit.
        hosts: the machines of the job (SageMaker ``SM_HOSTS``; on a cluster one name per
            node, ``node-<k>`` where only their number is known); empty for one machine.
        current_host: this machine's name among ``hosts`` (None for one machine).
        gpus: GPUs this machine offers (``SM_NUM_GPUS`` on SageMaker, else CUDA's count).
    """

    name: str
    data_dir: Optional[str]
    out_dir: str
    time_budget: Optional[float]
    hosts: Tuple[str, ...] = field(default=())
    current_host: Optional[str] = None
    gpus: int = 0

    def to_dict(self):
        d = asdict(self)
        d["hosts"] = list(self.hosts)
        return d

    def describe(self) -> str:
        """One line: name, session limit, machines and GPUs."""
        limit = "no session limit" if not self.time_budget else f"session limit {self.time_budget / 3600:.1f} h"
        machines = f"{len(self.hosts)} hosts (this: {self.current_host})" if len(self.hosts) > 1 else "1 host"
        return f"{self.name}: {limit}, {machines}, {self.gpus} GPU{'s' if self.gpus != 1 else ''} here"


def process_age() -> float:
    """Seconds since this process started (Linux ``/proc``; 0.0 where unknown).

    A platform's session limit runs from the start of the notebook's kernel, not from the
    call to ``train``: the engine subtracts this age from the platform's default budget,
    so several folds trained in one session share it.
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])   # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def device_label(device: Optional[torch.device] = None) -> str:
    """What a run computes on, for checkpoints and run tables: ``"cuda:0 Tesla T4
    (15.6 GiB)"`` or ``"cpu (2 threads)"`` (default device: CUDA when available)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"cuda:{index} {props.name} ({props.total_memory / 2 ** 30:.1f} GiB)"
    if dev.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(dev)


def _kaggle_data() -> Optional[str]:
    try:
        return str(find_competition_root())
    except LayoutError:
        return None


def _number(env: Mapping[str, str], name: str, kind=int):
    """``env[name]`` as a number, None when absent; a clear error naming the variable."""
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r}: expected a{'n integer' if kind is int else ' number'}") \
            from None


def _gpus(env: Mapping[str, str], real: bool) -> int:
    declared = _number(env, "SM_NUM_GPUS")
    if declared is not None:
        return declared
    return torch.cuda.device_count() if real and torch.cuda.is_available() else 0


def _time_limit(env: Mapping[str, str], default: Optional[float], age: float) -> Optional[float]:
    """``FWI_TIME_LIMIT`` when set, else Slurm's end time counted from the process start,
    else ``default``."""
    explicit = _number(env, "FWI_TIME_LIMIT", float)
    if explicit is not None:
        return explicit if explicit > 0 else None
    end = _number(env, "SLURM_JOB_END_TIME", float)
    if end is not None:
        return max(0.0, end - (time.time() - age))
    return default


def sagemaker_hosts(env: Mapping[str, str]) -> Tuple[Tuple[str, ...], Optional[str]]:
    """(hosts, current host) from ``SM_HOSTS`` (a JSON list) and ``SM_CURRENT_HOST``."""
    raw = env.get("SM_HOSTS")
    hosts: Tuple[str, ...] = ()
    if raw:
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, list) or not parsed or not all(isinstance(h, str) and h for h in parsed):
            raise ConfigError(f'environment variable SM_HOSTS={raw!r}: expected a JSON list of host names, '
                              f'e.g. ["algo-1", "algo-2"]')
        hosts = tuple(parsed)
    current = env.get("SM_CURRENT_HOST") or (hosts[0] if len(hosts) == 1 else None)
    if hosts and current not in hosts:
        raise ConfigError(f"environment variable SM_CURRENT_HOST={current!r} is not one of SM_HOSTS {list(hosts)}")
    return hosts, current


def sagemaker_channels(env: Mapping[str, str]) -> Dict[str, str]:
    """The job's input channels, ``{"training": "/opt/ml/input/data/training", ...}``
    (from the ``SM_CHANNEL_<NAME>`` variables)."""
    return {k[len("SM_CHANNEL_"):].lower(): v for k, v in sorted(env.items())
            if k.startswith("SM_CHANNEL_") and v}


def _cluster_hosts(env: Mapping[str, str]) -> Tuple[Tuple[str, ...], Optional[str]]:
    nodes = _number(env, "SLURM_JOB_NUM_NODES") or _number(env, "SLURM_NNODES")
    if nodes is None:     # torchrun over several machines: one agent per node
        nodes = _number(env, "GROUP_WORLD_SIZE")
        rank = _number(env, "GROUP_RANK")
    else:
        rank = _number(env, "SLURM_NODEID")
    if not nodes or nodes < 2:
        return (), None
    hosts = tuple(f"node-{k}" for k in range(nodes))
    return hosts, (hosts[rank] if rank is not None and 0 <= rank < nodes else None)


def _multi_machine_torchrun(env: Mapping[str, str]) -> bool:
    world, local = _number(env, "WORLD_SIZE"), _number(env, "LOCAL_WORLD_SIZE")
    return bool(world and local and world > local)


def detect_platform(environ: Optional[Mapping[str, str]] = None) -> Platform:
    """Detect the platform from environment variables (see the module's table).

    Args:
        environ: the variables to inspect (default ``os.environ``; with an explicit
            mapping the ``google.colab`` module check, the data search and the CUDA device
            count are skipped, for tests).
    """
    real = environ is None
    env = os.environ if real else environ
    age = process_age() if real else 0.0
    fwi_data = env.get("FWI_DATA") or None
    gpus = _gpus(env, real)
    if "KAGGLE_KERNEL_RUN_TYPE" in env:
        return Platform("kaggle", fwi_data or (_kaggle_data() if real else None), "/kaggle/working/runs",
                        _time_limit(env, KAGGLE_BUDGET, age), gpus=gpus)
    if "COLAB_RELEASE_TAG" in env or (real and has_module("google.colab")):
        drive = Path("/content/drive/MyDrive")
        out = str(drive / "fwi-runs") if real and drive.is_dir() else "/content/runs"
        return Platform("colab", fwi_data, out, _time_limit(env, COLAB_BUDGET, age), gpus=gpus)
    if any(k in env for k in SAGEMAKER_VARS):
        hosts, current = sagemaker_hosts(env)
        return Platform("sagemaker", fwi_data or env.get("SM_CHANNEL_TRAINING"),
                        env.get("SM_MODEL_DIR") or env.get("SM_OUTPUT_DATA_DIR") or "/opt/ml/model",
                        _time_limit(env, None, age), hosts, current, gpus)
    if "SLURM_JOB_ID" in env or _multi_machine_torchrun(env):
        hosts, current = _cluster_hosts(env)
        return Platform("cluster", fwi_data, "runs", _time_limit(env, None, age), hosts, current, gpus)
    return Platform("local", fwi_data, "runs", _time_limit(env, None, age), gpus=gpus)


def default_epochs(platform: Platform, time_budget: Optional[float] = None, local: int = 10) -> int:
    """The train kernel's default for ``epochs``: 0 (train until the budget, the schedule
    spanning it) where a session limit stops runs (Kaggle, Colab) or a budget was given,
    else ``local``."""
    return 0 if (time_budget or (time_budget is None and platform.time_budget)) else int(local)
