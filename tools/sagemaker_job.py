"""Write or submit a SageMaker training job for the source folder of ``tools.build --target sagemaker``.

    python -m tools.build --target sagemaker
    python -m tools.sagemaker_job --data s3://bucket/waveform-inversion/ --role arn:aws:iam::123:role/SM \\
        --instance-type ml.g5.12xlarge --instance-count 2 --checkpoint-s3 s3://bucket/ckpt/cnx-f0 --spot \\
        --write submit_job.py -- --model convnext_unet --epochs 30 --fold 0
    python submit_job.py                     # where the SDK and AWS credentials are
    python -m tools.sagemaker_job ... --submit -- --model convnext_unet   # or submit from here

The job is a SageMaker Python SDK (v2) ``PyTorch`` estimator with
``distribution={"torch_distributed": {"enabled": True}}``: SageMaker starts torchrun with
one process per GPU on every instance, and ``train_entry.py`` runs
:mod:`fwi_core.train` in each (see :mod:`fwi_core.sagemaker_entry`). The flags after
``--`` are ``python -m fwi_core.train`` flags; they travel as the estimator's
hyperparameters (``--key value`` pairs). ``--checkpoint-s3`` gives the job a checkpoint
folder synced to S3, so a spot instance that is reclaimed resumes from its last
checkpoint.

Without ``--write`` or ``--submit`` the estimator's and ``fit``'s arguments are printed
as JSON. The SDK is an optional dependency (``pip install "sagemaker>=2.200,<3"``), needed
only by ``--submit`` and by the written script; nothing here calls AWS otherwise.
"""
from __future__ import annotations

import argparse
import json
import pprint
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from fwi_core.sagemaker_entry import CHECKPOINT_DIR
from fwi_core.utils import atomic_write_text, optional_import

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "build" / "sagemaker"
ENTRY_POINT = "train_entry.py"
DISTRIBUTION = {"torch_distributed": {"enabled": True}}
FRAMEWORK_VERSION = "2.6.0"     # a SageMaker PyTorch training container; choose one your region offers
PY_VERSION = "py312"
SDK = 'pip install "sagemaker>=2.200,<3"'


class JobError(ValueError):
    """Arguments that cannot make a SageMaker job (the message names the option)."""


def hyperparameters(train_args: Sequence[str]) -> Dict[str, str]:
    """``python -m fwi_core.train`` flags as hyperparameters: ``["--epochs", "30",
    "--model=x", "--no-balance-families"]`` -> ``{"epochs": "30", "model": "x",
    "no-balance-families": ""}`` (SageMaker passes them back as ``--epochs 30 --model x
    --no-balance-families ""``; the entry point drops the empty value)."""
    out: Dict[str, str] = {}
    args = list(train_args)
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) < 3:
            raise JobError(f"training flag {a!r}: expected --name value pairs after '--'")
        if "=" in a:
            key, value = a[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = a[2:], args[i + 1]
            i += 2
        else:       # a bare flag (--no-balance-families): an empty value, dropped again by the entry point
            key, value = a[2:], ""
            i += 1
        if key in ("data", "out"):
            raise JobError(f"--{key}: the job decides it (the 'training' channel, the checkpoint folder / "
                           "SM_MODEL_DIR); drop it")
        out[key] = value
    return out


def estimator_kwargs(source_dir: Path, role: Optional[str], instance_type: str, instance_count: int = 1,
                     train_args: Sequence[str] = (), framework_version: str = FRAMEWORK_VERSION,
                     py_version: str = PY_VERSION, output_path: Optional[str] = None,
                     checkpoint_s3: Optional[str] = None, spot: bool = False, max_run_h: float = 24.0,
                     max_wait_h: Optional[float] = None, volume_gb: int = 100,
                     base_job_name: str = "fwi-train") -> Dict[str, Any]:
    """The keyword arguments of ``sagemaker.pytorch.PyTorch`` for this job."""
    source_dir = Path(source_dir)
    if not (source_dir / ENTRY_POINT).is_file():
        raise JobError(f"--source {source_dir}: no {ENTRY_POINT}; build it first: python -m tools.build --target sagemaker")
    if instance_count < 1:
        raise JobError(f"--instance-count must be >= 1, got {instance_count}")
    if not instance_type.startswith(("ml.", "local")):
        raise JobError(f"--instance-type {instance_type!r}: expected a SageMaker type such as ml.g5.xlarge (or local)")
    for flag, uri in (("--output", output_path), ("--checkpoint-s3", checkpoint_s3)):
        if uri is not None and not uri.startswith("s3://"):
            raise JobError(f"{flag} {uri!r}: expected an s3:// URI")
    if max_run_h <= 0:
        raise JobError(f"--max-run-h must be > 0, got {max_run_h}")
    kw: Dict[str, Any] = {
        "entry_point": ENTRY_POINT, "source_dir": str(source_dir), "role": role,
        "framework_version": framework_version, "py_version": py_version,
        "instance_type": instance_type, "instance_count": int(instance_count),
        "distribution": json.loads(json.dumps(DISTRIBUTION)),
        "hyperparameters": hyperparameters(train_args), "max_run": int(max_run_h * 3600),
        "volume_size": int(volume_gb), "base_job_name": base_job_name,
        "environment": {"FWI_PROGRESS": "0"},      # one log line per epoch, not per progress-bar update
    }
    if output_path:
        kw["output_path"] = output_path
    if checkpoint_s3:
        kw["checkpoint_s3_uri"] = checkpoint_s3
        kw["checkpoint_local_path"] = CHECKPOINT_DIR
    if spot:
        if not checkpoint_s3:
            raise JobError("--spot needs --checkpoint-s3: a reclaimed spot instance resumes from the checkpoints there")
        wait = max_wait_h if max_wait_h is not None else 2 * max_run_h
        if wait < max_run_h:
            raise JobError(f"--max-wait-h {wait} must be >= --max-run-h {max_run_h}")
        kw["use_spot_instances"] = True
        kw["max_wait"] = int(wait * 3600)
    return kw


def fit_kwargs(data: str, wait: bool = False, job_name: Optional[str] = None) -> Dict[str, Any]:
    """The keyword arguments of ``estimator.fit``: the data as the ``training`` channel."""
    if not data.startswith(("s3://", "file://")):
        raise JobError(f"--data {data!r}: expected an s3:// URI (or file:// for local mode) of the competition root")
    kw: Dict[str, Any] = {"inputs": {"training": data}, "wait": bool(wait)}
    if job_name:
        kw["job_name"] = job_name
    return kw


def script(est: Dict[str, Any], fit: Dict[str, Any]) -> str:
    """A Python script that submits the job with the SDK."""
    role = "sagemaker.get_execution_role()" if est.get("role") is None else None
    est_text = pprint.pformat({k: v for k, v in est.items() if not (k == "role" and role)}, width=100, sort_dicts=True)
    return (f'"""Submit the FWI training job (written by python -m tools.sagemaker_job).\n\n'
            f'Needs the SageMaker Python SDK ({SDK}) and AWS credentials."""\n'
            "import sagemaker\nfrom sagemaker.pytorch import PyTorch\n\n"
            f"ESTIMATOR = {est_text}\n"
            + (f"ESTIMATOR['role'] = {role}   # inside SageMaker Studio / a notebook instance\n" if role else "")
            + f"FIT = {pprint.pformat(fit, width=100, sort_dicts=True)}\n\n"
            "estimator = PyTorch(**ESTIMATOR)\n"
            "estimator.fit(**FIT)\n"
            'print("submitted:", estimator.latest_training_job.name)\n')


def submit(est: Dict[str, Any], fit: Dict[str, Any]):
    """Create the estimator with the SDK and call ``fit`` (calls AWS); returns the estimator."""
    pytorch = optional_import("sagemaker.pytorch", "submitting a SageMaker job", install=SDK)
    if est.get("role") is None:
        est = {**est, "role": optional_import("sagemaker", "submitting a SageMaker job", install=SDK).get_execution_role()}
    estimator = pytorch.PyTorch(**est)
    estimator.fit(**fit)
    return estimator


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(prog="python -m tools.sagemaker_job", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="s3:// URI of the competition root (the 'training' channel)")
    ap.add_argument("--role", default=None, help="IAM role ARN (default: the execution role, inside SageMaker)")
    ap.add_argument("--source", type=Path, default=SOURCE, help="the built source folder (default: build/sagemaker)")
    ap.add_argument("--instance-type", default="ml.g5.xlarge")
    ap.add_argument("--instance-count", type=int, default=1)
    ap.add_argument("--framework-version", default=FRAMEWORK_VERSION)
    ap.add_argument("--py-version", default=PY_VERSION)
    ap.add_argument("--output", default=None, help="s3:// URI for the model artifact (default: the SDK's bucket)")
    ap.add_argument("--checkpoint-s3", default=None, help="s3:// URI the checkpoint folder syncs to (resume on spot)")
    ap.add_argument("--spot", action="store_true", help="managed spot training (needs --checkpoint-s3)")
    ap.add_argument("--max-run-h", type=float, default=24.0)
    ap.add_argument("--max-wait-h", type=float, default=None, help="spot: hours to wait and run (default 2 x max run)")
    ap.add_argument("--volume-gb", type=int, default=100)
    ap.add_argument("--job-name", default=None)
    ap.add_argument("--wait", action="store_true", help="--submit: stream the logs until the job ends")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--write", type=Path, default=None, help="write a Python script that submits the job")
    what.add_argument("--submit", action="store_true", help="submit now with the SageMaker SDK")
    a = ap.parse_args(argv)
    try:
        est = estimator_kwargs(a.source, a.role, a.instance_type, a.instance_count, train_args, a.framework_version,
                               a.py_version, a.output, a.checkpoint_s3, a.spot, a.max_run_h, a.max_wait_h,
                               a.volume_gb)
        fit = fit_kwargs(a.data, a.wait, a.job_name)
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.write is not None:
        atomic_write_text(a.write, script(est, fit))
        print(f"wrote {a.write}: run it where the SageMaker SDK ({SDK}) and AWS credentials are")
    elif a.submit:
        try:
            estimator = submit(est, fit)
        except ImportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print("submitted:", estimator.latest_training_job.name)
    else:
        print(json.dumps({"estimator": est, "fit": fit}, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
