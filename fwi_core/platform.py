"""Where are we running? Kaggle, Colab, SageMaker or a local machine.

The platform decides the defaults a run needs when the config leaves them open: where the
data is, where outputs go and how long a session may last (Kaggle notebooks stop after
12 h, Colab sessions after about 12 h). Checkpoints have the same format everywhere.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional

from .data.layout import find_competition_root
from .errors import LayoutError
from .utils import has_module

KAGGLE_BUDGET = 11.5 * 3600.0   # 12 h session, minus time to save and upload
COLAB_BUDGET = 11.0 * 3600.0    # sessions last up to about 12 h


@dataclass(frozen=True)
class Platform:
    """A detected platform and its defaults.

    Attributes:
        name: "kaggle", "colab", "sagemaker" or "local".
        data_dir: default competition root, or None when none was found.
        out_dir: default parent folder of run folders.
        time_budget: default training budget in seconds, or None for no limit.
    """

    name: str
    data_dir: Optional[str]
    out_dir: str
    time_budget: Optional[float]

    def to_dict(self):
        return asdict(self)


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


def _kaggle_data() -> Optional[str]:
    try:
        return str(find_competition_root())
    except LayoutError:
        return None


def detect_platform(environ: Optional[Mapping[str, str]] = None) -> Platform:
    """Detect the platform from environment variables.

    Kaggle sets ``KAGGLE_KERNEL_RUN_TYPE``; Colab ``COLAB_RELEASE_TAG`` (or has the
    ``google.colab`` module); SageMaker ``SM_MODEL_DIR`` / ``SM_CHANNEL_TRAINING`` /
    ``SM_OUTPUT_DATA_DIR``. ``FWI_DATA`` overrides the data folder everywhere.

    Args:
        environ: the variables to inspect (default ``os.environ``; with an explicit
            mapping the ``google.colab`` module check is skipped, for tests).
    """
    real = environ is None
    env = os.environ if real else environ
    fwi_data = env.get("FWI_DATA") or None
    if "KAGGLE_KERNEL_RUN_TYPE" in env:
        return Platform("kaggle", fwi_data or (_kaggle_data() if real else None),
                        "/kaggle/working/runs", KAGGLE_BUDGET)
    if "COLAB_RELEASE_TAG" in env or (real and has_module("google.colab")):
        drive = Path("/content/drive/MyDrive")
        out = str(drive / "fwi-runs") if real and drive.is_dir() else "/content/runs"
        return Platform("colab", fwi_data, out, COLAB_BUDGET)
    if any(k in env for k in ("SM_MODEL_DIR", "SM_CHANNEL_TRAINING", "SM_OUTPUT_DATA_DIR")):
        return Platform("sagemaker", fwi_data or env.get("SM_CHANNEL_TRAINING"),
                        env.get("SM_MODEL_DIR") or env.get("SM_OUTPUT_DATA_DIR") or "/opt/ml/model", None)
    return Platform("local", fwi_data, "runs", None)


def default_epochs(platform: Platform, time_budget: Optional[float] = None, local: int = 10) -> int:
    """The train kernel's default for ``epochs``: 0 (train until the budget, the schedule
    spanning it) where a session limit stops runs (Kaggle, Colab) or a budget was given,
    else ``local``."""
    return 0 if (time_budget or (time_budget is None and platform.time_budget)) else int(local)
