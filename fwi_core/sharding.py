"""Work split over torchrun ranks: each rank its share, its own state, rank 0 merges.

    torchrun --nproc-per-node 8 -m fwi_core.predict --data ROOT --checkpoints runs/ --out submission.csv
    torchrun --nnodes 4 --node-rank K --nproc-per-node 8 --master-addr HOST0 --master-port 29500 \\
        -m fwi_core.predict ...                                  # 4 machines of 8 GPUs
    torchrun --nproc-per-node 2 -m tools.synth --out data/sim --samples-per-family 500

Under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) every process is one rank of
the job. :class:`Ranks` says which; :func:`shard_range` gives a rank its contiguous block
of whole batches of the work (so each batch is the batch a single process would run, and
deterministic stages give the same bytes); :class:`Coordinator` joins a gloo group for
what the ranks share: a barrier, gathering small objects, and :meth:`Coordinator.collect`,
which brings every rank's output files to rank 0 (copied over the group when rank 0 cannot
see them: ranks on other machines without a shared disk), checked by size and SHA-256.

:class:`ShardedPredict` is the predict command's side: the rank's test files, its own
CSV and state folder (``.<out name>.shards/rank-<r>-of-<n>.csv`` and its ``.state``
beside ``--out``, so a killed rank resumes its shard with the planner's own resume), and
:meth:`ShardedPredict.finish`: every rank's shard to rank 0, which concatenates them in
rank order into ``--out`` atomically (a reader sees the previous file or the complete new
one) with a summary of all shards. With one process all of it is a pass-through.

Each GPU rank computes on ``cuda:<LOCAL_RANK>``. The group waits for the slowest rank
(``timeout_s``, default 48 h; a rank that dies makes torchrun stop the others, and the same
command with the same inputs resumes every shard).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from .data.submission import HEADER, N_ROWS
from .errors import ConfigError, SubmissionError
from .inference_plan.progress import default_state_dir
from .inference_plan.source import TestFileSource
from .utils import atomic_path, atomic_write_text, remove_stale_temps

PathLike = Union[str, os.PathLike]

__all__ = ["Ranks", "shard_range", "deal", "Coordinator", "file_digest", "merge_csv_shards", "ShardedPredict",
           "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 48 * 3600.0
CHUNK = 16 << 20           # bytes per message when a file travels over the group


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "Ranks":
        env = os.environ if env is None else env
        values = {}
        for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            raw = env.get(name, default)
            if not raw.isdigit():
                raise ConfigError(f"environment variable {name}={raw!r}: expected a non-negative integer "
                                  "(torchrun sets it)")
            values[name] = int(raw)
        if values["WORLD_SIZE"] < 1 or values["RANK"] >= values["WORLD_SIZE"]:
            raise ConfigError(f"RANK={values['RANK']} with WORLD_SIZE={values['WORLD_SIZE']}: "
                              "expected 0 <= RANK < WORLD_SIZE")
        return cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        return f"rank-{self.rank:05d}-of-{self.world:05d}"

    def device(self, requested: Optional[str] = None) -> Optional[str]:
        """``requested``, else ``cuda:<LOCAL_RANK>`` when CUDA is there and the job has
        several ranks (None: the caller's default)."""
        if requested is not None or not self.enabled or not torch.cuda.is_available():
            return requested
        index = self.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return f"cuda:{index}"


def shard_range(n: int, world: int, rank: int, align: int = 1) -> range:
    """Rank ``rank``'s contiguous share of ``n`` items, in whole blocks of ``align``
    (a batch): the blocks are dealt as evenly as possible, the first ranks taking one more
    when they do not divide; a rank may get none."""
    if align < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_range: need align >= 1 and 0 <= rank < world, got {align}, {rank}, {world}")
    blocks = -(-n // align)
    base, extra = divmod(blocks, world)
    first = rank * base + min(rank, extra)
    count = base + (1 if rank < extra else 0)
    return range(min(n, first * align), min(n, (first + count) * align))


def deal(sizes: Sequence[float], world: int, rank: int) -> List[int]:
    """The units (indices into ``sizes``, their costs) that rank ``rank`` of ``world``
    takes: largest first, each to the least-loaded rank (ties: the lower rank), so every
    rank computes the same split; returned in index order."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"deal: need 0 <= rank < world, got {rank}, {world}")
    load = [0.0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return [i for i in range(len(sizes)) if owner[i] == rank]


def file_digest(path: PathLike) -> Tuple[int, str]:
    """(size in bytes, SHA-256 hex) of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


class Coordinator:
    """The gloo group of a sharded job (nothing to do for one process).

    Joins the default group from torchrun's variables (gloo, ``timeout_s``), or, when one
    exists already (e.g. NCCL), makes a gloo group beside it; :meth:`close` leaves what it
    created.
    """

    def __init__(self, ranks: Ranks, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.ranks = ranks
        self.group = None
        self._owns = False
        if not ranks.enabled:
            return
        timeout = datetime.timedelta(seconds=float(timeout_s))
        if dist.is_initialized():
            self.group = dist.new_group(backend="gloo", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
            self._owns = True

    def barrier(self) -> None:
        if self.ranks.enabled:
            dist.barrier(group=self.group)

    def all_gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` in rank order (``[obj]`` for one process)."""
        if not self.ranks.enabled:
            return [obj]
        out: List[Any] = [None] * self.ranks.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def collect(self, files: Sequence[PathLike]) -> List[List[Path]]:
        """Bring every rank's ``files`` to rank 0 at the same paths; returns every rank's
        list (rank order) on every rank.

        Rank 0 keeps what it already sees with the right size and SHA-256 (a shared disk);
        the others travel over the group, written atomically. Every rank calls it.
        """
        mine = [(str(p), *file_digest(p)) for p in files]
        manifests = self.all_gather(mine)
        if self.ranks.enabled:
            needed = []
            if self.ranks.is_main:
                for r, manifest in enumerate(manifests[1:], start=1):
                    needed += [(r, path, size, digest) for path, size, digest in manifest
                               if not (Path(path).is_file() and file_digest(path) == (size, digest))]
            box = [needed]
            dist.broadcast_object_list(box, src=0, group=self.group)
            for r, path, size, digest in box[0]:
                if self.ranks.rank == r:
                    self._send(path, size)
                elif self.ranks.is_main:
                    self._receive(r, path, size, digest)
            self.barrier()
        return [[Path(p) for p, _, _ in m] for m in manifests]

    def _send(self, path: str, size: int) -> None:
        with open(path, "rb") as f:
            for start in range(0, size, CHUNK):
                block = f.read(min(CHUNK, size - start))
                dist.send(torch.frombuffer(bytearray(block), dtype=torch.uint8), dst=0, group=self.group)

    def _receive(self, src: int, path: str, size: int, digest: str) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            for start in range(0, size, CHUNK):
                buf = torch.empty(min(CHUNK, size - start), dtype=torch.uint8)
                dist.recv(buf, src=src, group=self.group)
                f.write(buf.numpy().tobytes())
            f.flush()
            if file_digest(tmp) != (size, digest):
                raise SubmissionError(f"{path}: the copy from rank {src} does not match its SHA-256")

    def close(self) -> None:
        if self._owns and dist.is_initialized():
            dist.destroy_process_group()
        self._owns = False


def merge_csv_shards(shards: Sequence[PathLike], out: PathLike, expected: Sequence[int],
                     first_ids: Sequence[Optional[str]] = ()) -> Path:
    """Concatenate submission shards (each with the header) into ``out`` atomically.

    Args:
        shards: the shard CSVs in rank order.
        out: the merged CSV.
        expected: oids per shard (each must hold exactly ``70 * k`` rows).
        first_ids: the first oid of each shard (checked when given; None: empty shard).
    """
    header = (",".join(HEADER) + "\n").encode()
    out = Path(out)
    remove_stale_temps(out.parent, out.name)
    with atomic_path(out, suffix=".csv") as tmp, open(tmp, "wb") as dst:
        dst.write(header)
        for i, (shard, k) in enumerate(zip(shards, expected)):
            with open(shard, "rb") as src:
                if src.readline() != header:
                    raise SubmissionError(f"{shard}: not a submission shard (its first line is not the header)")
                first = src.readline()
                want = first_ids[i] if i < len(first_ids) else None
                if want is not None and not first.startswith(f"{want}_y_0,".encode()):
                    raise SubmissionError(f"{shard}: starts with {first[:20]!r}, expected oid {want!r}")
                rows = 1 if first else 0
                dst.write(first)
                while block := src.read(CHUNK):
                    rows += block.count(b"\n")
                    dst.write(block)
            if rows != N_ROWS * k:
                raise SubmissionError(f"{shard}: {rows} rows, expected {N_ROWS * k} ({k} oids x {N_ROWS}): "
                                      "an incomplete shard; run the same command again to resume it")
    return out


class ShardedPredict:
    """A predict run's shard on this rank (see the module doc); one process: the run itself.

    Args:
        out_csv: the submission the job writes.
        batch_size: the planner's batch (shards are whole batches).
        ranks: default :meth:`Ranks.from_env`.
        timeout_s: how long ranks wait for each other.
    """

    def __init__(self, out_csv: PathLike, batch_size: int, ranks: Optional[Ranks] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.final = Path(out_csv)
        self.batch_size = int(batch_size)
        self.ranks = ranks or Ranks.from_env()
        self.folder = self.final.parent / f".{self.final.name}.shards"
        self.coordinator = Coordinator(self.ranks, timeout_s)
        self.files: Optional[List[int]] = None
        self._state: Optional[Path] = None

    @property
    def enabled(self) -> bool:
        return self.ranks.enabled

    @property
    def out_csv(self) -> Path:
        """The CSV this rank's planner writes."""
        return self.folder / f"{self.ranks.tag}.csv" if self.enabled else self.final

    def state_dir(self, given: Optional[PathLike] = None) -> Optional[Path]:
        """This rank's state folder: ``<given>/<rank tag>``, else the planner's default
        for this rank's CSV (one process: ``given`` as it is)."""
        if not self.enabled:
            return None if given is None else Path(given)
        self._state = Path(given) / self.ranks.tag if given is not None else default_state_dir(self.out_csv)
        return self._state

    def keep_state(self, keep: bool = False) -> bool:
        """What the planner is told: a rank's state stays until the merge (so a rank that
        finished early is not redone when another rank's failure stops the job), then
        :meth:`finish` removes it unless ``keep``."""
        return True if self.enabled else keep

    def device(self, requested: Optional[str] = None) -> Optional[str]:
        return self.ranks.device(requested)

    def take(self, source: TestFileSource) -> TestFileSource:
        """This rank's files of ``source`` (whole batches, contiguous)."""
        if not self.enabled:
            return source
        part = shard_range(len(source), self.ranks.world, self.ranks.rank, self.batch_size)
        self.files = [len(shard_range(len(source), self.ranks.world, r, self.batch_size))
                      for r in range(self.ranks.world)]
        self._firsts = [source.ids[shard_range(len(source), self.ranks.world, r, self.batch_size).start]
                        if self.files[r] else None for r in range(self.ranks.world)]
        return TestFileSource(files=source.files[part.start:part.stop])

    def empty(self) -> bool:
        """This rank has no files (more ranks than batches): it writes an empty shard."""
        return self.enabled and self.files is not None and self.files[self.ranks.rank] == 0

    def write_empty(self) -> None:
        atomic_write_text(self.out_csv, ",".join(HEADER) + "\n")

    def run(self, run_shard: Callable[[Path, Optional[Path], bool], Any], state_dir: Optional[PathLike] = None,
            keep_state: bool = False) -> Any:
        """Run this rank's shard and merge: ``run_shard(out_csv, state_dir, keep_state)``
        runs the planner (one process: with the job's own CSV, state folder and
        ``keep_state``); a rank without files writes an empty shard; then :meth:`finish`.
        Returns what ``run_shard`` returned (None for an empty shard)."""
        if not self.enabled:
            return run_shard(self.final, None if state_dir is None else Path(state_dir), keep_state)
        try:
            if self.empty():
                self.write_empty()
                result = None
            else:
                result = run_shard(self.out_csv, self.state_dir(state_dir), self.keep_state(keep_state))
        except BaseException:
            self.coordinator.close()
            raise
        self.finish(keep_state=keep_state)
        return result

    def finish(self, summary: Optional[Any] = None, keep_state: bool = False) -> Optional[Path]:
        """Every rank: hand its shard (and its summary) to rank 0, which merges them into
        the final CSV and ``<stem>_summary.json``; then the shards go (unless
        ``keep_state``). Returns the merged CSV on rank 0, None on the others."""
        if not self.enabled:
            return self.final
        if self.files is None:
            raise RuntimeError("ShardedPredict.finish before take(): no shards to merge")
        summary_file = self.out_csv.with_name(self.out_csv.stem + "_summary.json")
        mine = [self.out_csv] + ([summary_file] if summary_file.is_file() else [])
        try:
            gathered = self.coordinator.collect(mine)
            merged = None
            if self.ranks.is_main:
                shards = [g[0] for g in gathered]
                merged = merge_csv_shards(shards, self.final, self.files, self._firsts)
                self._merge_summaries([g[1] if len(g) > 1 else None for g in gathered])
                print(f"merged {self.ranks.world} shards ({sum(self.files)} oids) into {self.final}", flush=True)
            self.coordinator.barrier()
            if not keep_state:
                for p in mine:
                    p.unlink(missing_ok=True)
                if self._state is not None:
                    shutil.rmtree(self._state, ignore_errors=True)
                if self.ranks.is_main:
                    for g in gathered:
                        for p in g:
                            Path(p).unlink(missing_ok=True)
                    shutil.rmtree(self.folder, ignore_errors=True)
            return merged
        finally:
            self.coordinator.close()

    def _merge_summaries(self, files: Sequence[Optional[Path]]) -> None:
        shards: List[Dict[str, Any]] = [json.loads(Path(f).read_text()) if f is not None else {"files": 0}
                                        for f in files]
        merged = {
            "csv": str(self.final), "files": sum(s.get("files", 0) for s in shards), "ranks": self.ranks.world,
            "met_deadline": all(s.get("met_deadline", True) for s in shards),
            "elapsed_s": max((s.get("elapsed_s") or 0.0) for s in shards),
            "fallback_files": sum(s.get("fallback_files", 0) for s in shards),
            "bad_files": {k: v for s in shards for k, v in (s.get("bad_files") or {}).items()},
            "shards": shards,
        }
        atomic_write_text(self.final.with_name(self.final.stem + "_summary.json"),
                          json.dumps(merged, indent=1, default=str) + "\n")
