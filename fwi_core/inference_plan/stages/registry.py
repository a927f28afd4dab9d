"""Stage names: the registry behind stage lists (``--stages``, the infer kernel's
``stages``) and :func:`build_stages`, which turns a list into stage objects.

``members`` and ``member:<name>`` are built in (one :class:`MemberStage` per member);
every other name is registered with :func:`register_stage` (each built-in stage at the
end of its own module).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

from ...errors import StageError
from .base import Stage
from .members import MemberStage

__all__ = ["DEFAULT_STAGES", "StageFactory", "register_stage", "registered_stages", "check_stage_names", "build_stages"]

#: The default stage list, in priority order ("members" expands to one stage per member,
#: the cheapest good one first).
DEFAULT_STAGES = ("members", "flip", "crf", "mc_dropout", "refine_layered", "refine", "consistency")

StageFactory = Callable[[Dict[str, Any]], Stage]
_REGISTRY: Dict[str, StageFactory] = {}


def register_stage(name: str, factory: StageFactory) -> None:
    """Make ``name`` usable in stage lists (``--stages``, the infer kernel's ``stages``).

    Args:
        name: the stage name.
        factory: ``factory(resources) -> Stage``; ``resources`` holds ``ensemble``,
            ``crf`` (or None), ``mc_passes``, ``device``, ``checkpoints``.
    """
    if not name or ":" in name or name in ("members", "member"):
        raise StageError(f"register_stage: invalid or reserved stage name {name!r}")
    _REGISTRY[name] = factory


def registered_stages() -> List[str]:
    """Names that stage lists may use besides ``members`` and ``member:<name>``."""
    return sorted(_REGISTRY)


def check_stage_names(specs: Sequence[Any], members: Sequence[str]) -> None:
    """Raise :class:`StageError` for a name that is not ``members``, ``member:<name>`` of
    one of ``members`` or a registered stage (before any work starts)."""
    for spec in specs:
        if isinstance(spec, Stage) or spec == "members":
            continue
        if isinstance(spec, str) and spec.startswith("member:"):
            if spec.split(":", 1)[1] not in members:
                raise StageError(f"stage {spec!r}: no member {spec.split(':', 1)[1]!r}; members: {', '.join(members)}")
        elif not (isinstance(spec, str) and spec in _REGISTRY):
            raise StageError(f"unknown stage {spec!r}; known: members, member:<name>, "
                             f"{', '.join(registered_stages())}")


def build_stages(specs: Sequence[Any], member_order: Sequence[str], resources: Dict[str, Any]) -> List[Stage]:
    """Stage objects from names (or Stage objects), in priority order.

    Args:
        specs: names (``members``, ``member:<name>``, registered names) or Stage objects.
        member_order: the order ``members`` expands to (cheapest good member first).
        resources: passed to registered factories.

    Raises:
        StageError: unknown names or members, duplicates, a list not starting with a
            member (or another ``starts`` stage such as ``prior``), a ``starts`` stage that
            is not first, a producer beside ``prior`` (it replaces the members), or a
            producer after a transform that it would overwrite.
    """
    members = list(resources["ensemble"].member_names)
    out: List[Stage] = []
    for spec in specs:
        if isinstance(spec, Stage):
            out.append(spec)
        elif spec == "members":
            out.extend(MemberStage(m) for m in member_order if f"member:{m}" not in [s.name for s in out])
        elif isinstance(spec, str) and spec.startswith("member:"):
            check_stage_names([spec], members)
            out.append(MemberStage(spec.split(":", 1)[1]))
        else:
            check_stage_names([spec], members)
            out.append(_REGISTRY[spec](resources))
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise StageError(f"stage list names {dupes} twice")
    if not out or not out[0].starts:
        raise StageError(f"the first stage must be a member or 'prior' (it writes the first complete submission), "
                         f"got {names[:1] or 'nothing (no members: give checkpoints, or a prior submission)'}")
    late = [s.name for s in out[1:] if s.starts and not isinstance(s, MemberStage)]
    if late:
        raise StageError(f"stage {late[0]!r} must come first: it writes the first complete prediction")
    if not isinstance(out[0], MemberStage):
        producers = [s.name for s in out if s.producer]
        if producers:
            raise StageError(f"stage {out[0].name!r} replaces the members: the list cannot also hold {producers} "
                             f"(drop them, or drop {out[0].name!r})")
    for i, s in enumerate(out):
        if s.producer:
            blockers = [t.name for t in out[:i] if not t.producer and not t.reapply]
            if blockers:
                raise StageError(f"stage {s.name!r} comes after {blockers}, whose result it would overwrite: "
                                 "put member/flip/mc_dropout stages first")
    return out
