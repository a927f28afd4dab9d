"""The model a run trains: its architecture (``cfg.model``, or a residual stage on a frozen
backbone), the raw and EMA weights, the DDP wrapper, and the family vocabulary of models
with per-family terms (the ``family_terms`` capability in the model registry).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset

from ..errors import ConfigError, TrainError
from ..models import create_model, model_capabilities
from ..models.checkpoint import read_metadata
from ..physics.families import FAMILIES
from .config import TrainConfig
from .datasets import families_of
from .distributed import DistInfo


def architecture(cfg: TrainConfig) -> Tuple[str, Dict[str, Any]]:
    """The model to build: ``cfg.model``, or with ``backbone_checkpoint`` a
    ``residual_stage`` of the frozen backbone (rebuilt from its checkpoint's metadata)
    and ``cfg.model`` as the member trained on its residual."""
    if not cfg.backbone_checkpoint:
        return cfg.model, dict(cfg.model_kwargs)
    meta = read_metadata(cfg.backbone_checkpoint)
    if meta.get("model") == "residual_stage":
        raise ConfigError(f"backbone_checkpoint={cfg.backbone_checkpoint} is itself a residual stage: "
                          "use a plain model's checkpoint as the backbone")
    return "residual_stage", {"backbone": meta["model"], "backbone_kwargs": dict(meta.get("model_kwargs") or {}),
                              "member": cfg.model, "member_kwargs": dict(cfg.model_kwargs)}


@dataclass
class TrainedModel:
    """The raw weights (``raw``), their EMA (``ema``, None with ``ema_decay`` = 0) and
    what the forward pass calls (``wrapped``: DDP around ``raw`` under DDP, else ``raw``)."""

    name: str
    kwargs: Dict[str, Any]
    raw: nn.Module
    ema: Optional[AveragedModel]
    wrapped: nn.Module
    family_names: Optional[List[str]] = None

    @classmethod
    def build(cls, cfg: TrainConfig, dist: DistInfo) -> "TrainedModel":
        """Build the model on the device (SyncBatchNorm with ``sync_bn`` under DDP), the
        backbone loaded for a residual stage, and its EMA."""
        name, kwargs = architecture(cfg)
        try:
            raw = create_model(name, **kwargs)
        except (TypeError, ValueError) as exc:     # unknown or bad model_kwargs
            raise ConfigError(f"model_kwargs {dict(cfg.model_kwargs)} do not fit model {cfg.model!r}: {exc}") from exc
        if cfg.backbone_checkpoint:
            raw.load_backbone(cfg.backbone_checkpoint)
        raw = raw.to(dist.device)
        if cfg.sync_bn and dist.enabled:
            raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw)
        ema = None
        if cfg.ema_decay > 0:
            ema = AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
            ema.module.eval()
        elif cfg.monitor == "mae_ema":
            raise ConfigError("monitor='mae_ema' needs EMA: set ema_decay > 0")
        return cls(name, kwargs, raw, ema, raw)

    def fresh(self) -> nn.Module:
        """A new instance of the architecture (to load saved weights into)."""
        return create_model(self.name, **self.kwargs)

    def wrap(self, dist: DistInfo) -> None:
        """Under DDP, wrap the raw model (after its weights are final: resumed or built)."""
        if dist.enabled:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.raw, device_ids=ids)

    def sources(self) -> Dict[str, nn.Module]:
        """The weights validation compares: ``raw`` and (with EMA) ``ema``."""
        return {"raw": self.raw, **({"ema": self.ema.module} if self.ema is not None else {})}

    def set_family_vocabulary(self, cfg: TrainConfig, train_ds: Dataset) -> None:
        """Family names indexed by the model's per-family terms (models declaring
        ``family_terms``, built with ``num_families`` > 0): the competition's 10 families,
        or the sorted training families when the data uses other names; None for models
        without them."""
        n = int(self.raw.num_families or 0) if model_capabilities(self.raw).family_terms else 0
        if n <= 0:
            self.family_names = None
            return
        seen = sorted(set(families_of(train_ds)))
        names = list(FAMILIES) if set(seen) <= set(FAMILIES) else seen
        if len(names) > n:
            raise ConfigError(f"model {cfg.model!r} has num_families={n} but the data has {len(names)} "
                              f"families ({', '.join(names)}): set model_kwargs num_families >= {len(names)}")
        self.family_names = names

    def family_index(self, families, device: torch.device) -> Optional[torch.Tensor]:
        """(B,) long positions of a batch's family names in the vocabulary (None for
        models without per-family terms)."""
        if self.family_names is None or families is None:
            return None
        pos = {f: i for i, f in enumerate(self.family_names)}
        try:
            return torch.tensor([pos[str(f)] for f in families], dtype=torch.long, device=device)
        except KeyError as exc:
            raise TrainError(f"family {exc.args[0]!r} is not one of the model's families "
                             f"{self.family_names}") from None
