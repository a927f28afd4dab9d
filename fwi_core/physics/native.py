"""The native CPU path of the simulator: a C++ kernel built at first use, cached on disk.

:func:`simulate` (``backend="native"``, or ``"auto"`` on a CPU where the kernel builds)
and its gradient run here; the torch path of :mod:`.forward` / :mod:`.adjoint` stays the
fallback and the reference, and the native path agrees with it to float32 rounding
(``tests/physics/test_native.py``). What the kernel does is described in
:mod:`.native_src`.

Build: the source (:data:`.native_src.SOURCE`) is compiled with the system's C++ compiler
(``$CXX``, else ``g++``, ``c++`` or ``clang++``) into a shared library loaded through
``ctypes`` (no torch headers, so a build takes a few seconds, not the minute a torch
extension takes). The library is cached under ``$FWI_NATIVE_DIR`` (default
``~/.cache/fwi_core/native``), named by a hash of the source, the flags, the compiler's
version and the CPU (it is built with ``-march=native``), so a copied cache never runs on a
CPU it was not built for; concurrent builds write temporary files and rename them into
place. Where no compiler is found or the build fails, :func:`available` is False,
:func:`unavailable_reason` says why, ``backend="auto"`` warns once and runs the torch path,
and ``backend="native"`` raises. ``FWI_NATIVE=0`` turns the native path off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..errors import NativeUnavailable
from .native_src import SOURCE
from .stencil import Geometry, scheme_coefficients, stencil_weights

#: compiler flags: no fused multiply-adds (the host's rounding), no -ffast-math
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC",
         "-pthread")
#: the flags of a second try where ``-march=native`` is not understood
PORTABLE_FLAGS = tuple(f for f in FLAGS if f != "-march=native")
BUILD_TIMEOUT_S = 300

_LOCK = threading.Lock()
_STATE: dict = {"lib": None, "error": None, "warned": False}


def cache_dir() -> Path:
    """Where built libraries are kept: ``$FWI_NATIVE_DIR``, else ``~/.cache/fwi_core/native``."""
    env = os.environ.get("FWI_NATIVE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fwi_core" / "native"


def find_compiler() -> Optional[str]:
    """The C++ compiler to build with: ``$CXX``, else the first of g++, c++, clang++ on PATH."""
    names = ([os.environ["CXX"]] if os.environ.get("CXX") else []) + ["g++", "c++", "clang++"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_signature() -> str:
    """The CPU's model and feature flags (``-march=native`` code runs only where they match)."""
    sig = [platform.machine(), platform.processor()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                sig.append(line)
                if len(sig) >= 4:
                    break
    except OSError:
        pass
    return "\n".join(sig)


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def library_path(cxx: str, flags: Tuple[str, ...] = FLAGS) -> Path:
    """The cached library's path for this source, compiler, flags and CPU."""
    key = hashlib.sha256("\0".join([SOURCE, " ".join(flags), _compiler_version(cxx), _cpu_signature()])
                         .encode()).hexdigest()[:16]
    return cache_dir() / f"fwi_stencil_{key}.so"


def build(force: bool = False) -> Path:
    """Compile the kernel (unless a cached build exists) and return the library's path.

    Raises:
        NativeUnavailable: no compiler, or the compiler failed (its last output lines included).
    """
    cxx = find_compiler()
    if cxx is None:
        raise NativeUnavailable("no C++ compiler found (set CXX or install g++)")
    errors = []
    for flags in (FLAGS, PORTABLE_FLAGS):
        target = library_path(cxx, flags)
        if target.is_file() and not force:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            src = Path(tmp) / "fwi_stencil.cpp"
            src.write_text(SOURCE)
            so = Path(tmp) / target.name
            try:
                res = subprocess.run([cxx, *flags, str(src), "-o", str(so)], capture_output=True, text=True,
                                     timeout=BUILD_TIMEOUT_S)
            except (OSError, subprocess.SubprocessError) as e:
                errors.append(f"{cxx}: {e}")
                continue
            if res.returncode == 0 and so.is_file():
                os.replace(so, target)
                return target
            errors.append(f"{cxx} {' '.join(flags)}: " + "\n".join((res.stderr or res.stdout).splitlines()[-5:]))
    raise NativeUnavailable("the C++ build failed: " + " | ".join(errors))


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.fwi_native_version.restype = i
    lib.fwi_forward.argtypes = [i, i, i, i, i, i, p, p, p, p, i, i, f, f, p, p, i, p, i, p, i, p, p, i, i, i]
    lib.fwi_forward.restype = i
    lib.fwi_backward.argtypes = [i, i, i, i, i, i, p, p, p, p, i, i, f, f, p, p, i, p, i, i, p, i, p, p, i, p,
                                 p, i, i]
    lib.fwi_backward.restype = i
    return lib


def library() -> ctypes.CDLL:
    """The loaded kernel library, built on first use (once per process; thread-safe).

    Raises:
        NativeUnavailable: turned off (``FWI_NATIVE=0``), or it cannot be built or loaded.
    """
    if os.environ.get("FWI_NATIVE", "1") == "0":
        raise NativeUnavailable("turned off by FWI_NATIVE=0")
    with _LOCK:
        if _STATE["lib"] is None and _STATE["error"] is None:
            try:
                _STATE["lib"] = _load(build())
            except (NativeUnavailable, OSError, AttributeError) as e:
                _STATE["error"] = str(e)
        if _STATE["lib"] is None:
            raise NativeUnavailable(_STATE["error"])
        return _STATE["lib"]


def available() -> bool:
    """Whether the native kernel can run here (builds it on the first call)."""
    try:
        library()
        return True
    except NativeUnavailable:
        return False


def unavailable_reason() -> Optional[str]:
    """Why the native kernel cannot run here, or None if it can."""
    try:
        library()
        return None
    except NativeUnavailable as e:
        return str(e)


def warn_fallback() -> None:
    """Warn once per process that ``backend="auto"`` runs the (slower) torch path on the CPU."""
    if not _STATE["warned"]:
        _STATE["warned"] = True
        warnings.warn(f"fwi_core.physics: the native CPU kernel is unavailable ({unavailable_reason()}); "
                      "simulate runs the torch path instead (about 2-3x slower)", RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------
# the problem in the kernel's terms


@dataclass(frozen=True)
class Layout:
    """Where things are on the padded grid, in the kernel's terms (built by :func:`layout`)."""

    H: int  # padded rows
    W: int  # padded columns
    R: int  # rows of alpha_rows (the unpadded map's)
    x0: int  # first column between the x-pads
    x1: int  # first column of the right x-pad
    sz: int  # source row
    rz: int  # receiver row
    src: Tuple[int, ...]  # source columns
    rec: Tuple[int, ...]  # receiver columns
    row_of: Tuple[int, ...]  # (H,) the alpha row of each padded row


def layout(geom: Geometry, h: int, w: int) -> Layout:
    """The kernel's view of ``geom`` on an ``h x w`` map padded by ``geom.nbc`` cells."""
    nbc = geom.nbc
    return Layout(H=h + 2 * nbc, W=w + 2 * nbc, R=h, x0=nbc, x1=nbc + w, sz=geom.source_row + nbc,
                  rz=geom.receiver_row + nbc, src=tuple(int(c) + nbc for c in geom.source_columns),
                  rec=tuple(int(c) + nbc for c in geom.receivers(w)),
                  row_of=tuple(min(max(i - nbc, 0), h - 1) for i in range(h + 2 * nbc)))


def compact_coefficients(vel: torch.Tensor, geom: Geometry) -> dict:
    """The scheme's coefficients in the kernel's compact form, from the float32 planes of
    :func:`.stencil.scheme_coefficients` (so the values are the host's, bit for bit).

    Args:
        vel: (B, h, w) float32 velocity (may require grad).
    Returns:
        ``alpha_rows`` (B, h, Wp): alpha on the model's rows, pad columns included
        (differentiable); ``amp`` (B, n_sources): ``beta`` at the sources (differentiable);
        ``kx`` (B, Wp) and ``kz`` (B, Hp): kappa along a model row and a model column (constants).
    """
    nbc = geom.nbc
    h = vel.shape[1]
    co = scheme_coefficients(vel, geom)
    kappa = co["kappa"].detach()
    src = torch.tensor([int(c) + nbc for c in geom.source_columns], device=vel.device)
    return {"alpha_rows": co["alpha"][:, nbc:nbc + h, :], "amp": co["beta"][:, geom.source_row + nbc, src],
            "kx": kappa[:, nbc, :].contiguous(), "kz": kappa[:, :, nbc].contiguous()}


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _check(t: torch.Tensor, shape: tuple, name: str, dtype=torch.float32) -> torch.Tensor:
    if t.device.type != "cpu" or t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(f"native: {name} must be a CPU {dtype} tensor of shape {shape}, got "
                         f"{t.device.type} {t.dtype} {tuple(t.shape)}")
    return t.contiguous()


def _common(lay: Layout, alpha_rows, kx, kz, amp, wav) -> tuple:
    b = alpha_rows.shape[0]
    n = len(lay.src)
    nt = wav.shape[0]
    ar = _check(alpha_rows.detach(), (b, lay.R, lay.W), "alpha_rows")
    kx = _check(kx.detach(), (b, lay.W), "kx")
    kz = _check(kz.detach(), (b, lay.H), "kz")
    amp = _check(amp.detach(), (b, n), "amp")
    wav = _check(wav, (nt,), "wavelet")
    row_of = torch.tensor(lay.row_of, dtype=torch.int32)
    src = torch.tensor(lay.src, dtype=torch.int32)
    rec = torch.tensor(lay.rec, dtype=torch.int32)
    c2, c3 = stencil_weights(torch.float32)
    return b, n, nt, ar, kx, kz, amp, wav, row_of, src, rec, c2, c3


def _threads(threads: Optional[int]) -> int:
    return max(1, int(threads) if threads else torch.get_num_threads())


def forward(lay: Layout, alpha_rows: torch.Tensor, kx: torch.Tensor, kz: torch.Tensor, amp: torch.Tensor,
            wav: torch.Tensor, *, keep_every: int = 0, flush_denormal: bool = True,
            threads: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Propagate every shot of every sample.

    Args:
        lay: the grid (:func:`layout`); alpha_rows, kx, kz, amp: as :func:`compact_coefficients`
            returns them; wav: (nt,) float32 wavelet.
        keep_every: if > 0, keep the checkpoints the backward needs, every ``keep_every`` steps.
        flush_denormal: flush denormals to zero in the kernel's threads.
        threads: worker threads (default ``torch.get_num_threads()``).
    Returns:
        ``(traces (B, n_sources, nt, n_receivers), checkpoints or None)``.
    """
    b, n, nt, ar, kx, kz, amp, wav, row_of, src, rec, c2, c3 = _common(lay, alpha_rows, kx, kz, amp, wav)
    out = torch.empty(b, n, nt, len(lay.rec))
    ckpt = None
    if keep_every > 0:
        nck = -(-nt // keep_every) - 1
        ckpt = torch.empty(b, n, nck, 2, lay.H, lay.W)
    rc = library().fwi_forward(b, n, lay.H, lay.W, lay.R, nt, _ptr(ar), _ptr(row_of), _ptr(kx), _ptr(kz), lay.x0,
                               lay.x1, c2, c3, _ptr(amp), _ptr(src), lay.sz, _ptr(wav), lay.rz, _ptr(rec),
                               len(lay.rec), _ptr(out), _ptr(ckpt), max(1, keep_every), _threads(threads),
                               int(flush_denormal))
    if rc != 0:
        raise MemoryError("native forward: out of memory")
    return out, ckpt


def backward(lay: Layout, alpha_rows: torch.Tensor, kx: torch.Tensor, kz: torch.Tensor, amp: torch.Tensor,
             wav: torch.Tensor, grad: torch.Tensor, ckpt: Optional[torch.Tensor], every: int, *,
             flush_denormal: bool = True, threads: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The adjoint of :func:`forward`: gradients of ``<traces, grad>``.

    Args:
        grad: (B, n_sources, nt, n_receivers) gradient of the traces.
        ckpt, every: what :func:`forward` kept with ``keep_every=every``.
    Returns:
        ``(d/d alpha_rows (B, h, Wp), d/d amp (B, n_sources))``; ``alpha_rows`` acts through
        ``temp1`` as well (``temp1 = 2 - 5 alpha - kappa``).
    """
    b, n, nt, ar, kx, kz, amp, wav, row_of, src, rec, c2, c3 = _common(lay, alpha_rows, kx, kz, amp, wav)
    grad = _check(grad.detach().float(), (b, n, nt, len(lay.rec)), "grad")
    nck = -(-nt // every) - 1
    if nck > 0:
        ckpt = _check(ckpt, (b, n, nck, 2, lay.H, lay.W), "checkpoints")
    nz = [i for i in range(nt) if float(wav[i]) != 0.0]
    src_steps = nz[-1] + 1 if nz else 0
    g_rows = torch.empty(b, n, lay.R, lay.W)
    g_amp = torch.empty(b, n)
    rc = library().fwi_backward(b, n, lay.H, lay.W, lay.R, nt, _ptr(ar), _ptr(row_of), _ptr(kx), _ptr(kz), lay.x0,
                                lay.x1, c2, c3, _ptr(amp), _ptr(src), lay.sz, _ptr(wav), src_steps, lay.rz,
                                _ptr(rec), len(lay.rec), _ptr(grad), _ptr(ckpt) if nck > 0 else None, every,
                                _ptr(g_rows), _ptr(g_amp), _threads(threads), int(flush_denormal))
    if rc != 0:
        raise MemoryError("native backward: out of memory")
    return g_rows.sum(1), g_amp
