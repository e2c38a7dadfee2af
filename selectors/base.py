"""Training plumbing shared by every selector objective.

A :class:`SelectorModule` wraps one plain ``nn.Module`` network (``self.net``, a
:class:`~tokensel.selectors.inference.SelectorNet`) and an objective. A subclass supplies:

- ``config_cls``: its config dataclass (``selector.*``);
- ``build_net(config, dims)``: the network, from the config and the feature geometry;
- ``step(batch)``: a :class:`StepOutput` with the loss and its logged parts.

This class does the rest the same way for every objective, so runs compare tag for tag:
``train/<scalar>`` every step, ``val/<scalar>`` reduced once per validation (weighted by
samples, synced across ranks), the optimiser and LR schedule, and checkpoints that hold the
selector network only (the encoder lives in the datamodule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric

from tokensel.common.errors import ConfigError
from tokensel.datamodules.batch import FeatureBatch, FeatureDims
from tokensel.selectors.inference import SelectionContext, SelectorNet
from tokensel.selectors.metrics import keep_mask

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("cosine", "constant")


def check_all(checks: list[tuple[bool, str]]) -> None:
    """Raise :class:`ConfigError` with the message of the first failed ``(ok, message)`` check."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


@dataclass
class SelectorConfig:
    """Fields every ``selector.*`` config has; objectives extend it.

    ``optim_defaults``: the objective's own ``optim.*`` defaults (e.g. vp_noise trains with AdamW
    at 2e-4), applied under any YAML, so a run never silently gets another objective's optimiser.
    """

    optim_defaults: ClassVar[dict] = {}
    name: str = "?"


@dataclass
class OptimConfig:
    """``optim.*``. Defaults follow the Gumbel paper (Sec. 4.6): Adam, cosine, 5 % warm-up, lr 1e-5."""

    name: str = "adam"  # "adam" | "adamw"
    lr: float = 1e-5  # the paper: 1e-5 for LLaVA-like encoders, 5e-6 for InternVL-like
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "cosine"  # "cosine" | "constant"
    warmup: float = 0.05  # fraction of each stage spent warming up linearly
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    # Relative lengths of consecutive cosine cycles over the run, each with its own warm-up.
    # The paper trains "in three stages (60+20+20 epochs)" without saying what changes between
    # them; we read that as warm restarts: stages=[60, 20, 20]. Empty: one cycle.
    stages: List[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_all([
            (self.name in OPTIMIZERS, f"optim.name={self.name!r}: expected one of {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"optim.schedule={self.schedule!r}: expected one of {', '.join(SCHEDULES)}"),
            (self.lr > 0, f"optim.lr={self.lr}: must be positive"),
            (0 <= self.warmup < 1, f"optim.warmup={self.warmup}: must be in [0, 1)"),
            (len(self.betas) == 2, f"optim.betas={list(self.betas)}: expected two numbers"),
            (all(s > 0 for s in self.stages), f"optim.stages={list(self.stages)}: lengths must be positive"),
        ])


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """LR factor at ``step``: per stage, linear warm-up then cosine decay to ``min_lr_ratio``."""
    if cfg.schedule == "constant" or total_steps <= 0:
        return 1.0
    lengths = cfg.stages or [1.0]
    bounds = [round(total_steps * sum(lengths[: i + 1]) / sum(lengths)) for i in range(len(lengths))]
    start = 0
    for end in bounds:
        if step < end or end == bounds[-1]:
            break
        start = end
    span = max(1, end - start)
    t = min(max(step - start, 0), span)
    warm = int(cfg.warmup * span)
    if t < warm:
        return (t + 1) / warm
    progress = (t - warm) / max(1, span - warm)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class StepOutput:
    """What an objective's ``step`` returns.

    ``scalars`` holds every logged number, ``loss`` included; ``keep`` is the (B, N) keep mask
    (or scores in [0, 1]) for panels; ``recon`` the reconstructed image, when there is one;
    ``n`` the samples the scalars average over (default: the whole batch; 0 skips the batch).
    """

    loss: torch.Tensor
    scalars: Dict[str, torch.Tensor]
    keep: torch.Tensor
    recon: Optional[torch.Tensor] = None
    n: Optional[int] = None


@dataclass
class PanelView:
    """What :meth:`SelectorModule.visualise` returns: the ``(B, N)`` kept tokens (a mask, or scores
    in [0, 1]) and the image reconstructed from them, when the objective makes one."""

    keep: torch.Tensor
    recon: Optional[torch.Tensor] = None


class SelectorModule(L.LightningModule):
    """The LightningModule every objective extends (see the module docstring)."""

    config_cls: ClassVar[type] = SelectorConfig
    # Scalars logged under val/ (reduced over the whole validation set); ``step`` returns them in
    # eval mode. In training every scalar ``step`` returns is logged under train/.
    scalar_names: ClassVar[tuple[str, ...]] = ("loss",)
    prog_bar_scalars: ClassVar[tuple[str, ...]] = ("loss",)

    def __init__(self, selector: dict, dims: dict, optim: Optional[dict] = None, config: Optional[dict] = None):
        super().__init__()
        # ``config`` is the whole run config, kept for TensorBoard's hparams and provenance.
        self.save_hyperparameters()
        self.config, self.dims = self.parse_hparams(self.hparams)
        self.optim_config = OptimConfig(**(optim or {}))
        self.net: SelectorNet = self.build_net(self.config, self.dims)
        self.val_scalars = nn.ModuleDict({name: MeanMetric() for name in self.scalar_names})
        self.val_samples = SumMetric()

    # ---- what an objective implements --------------------------------------------------------
    @classmethod
    def build_net(cls, config: Any, dims: FeatureDims) -> SelectorNet:
        raise NotImplementedError

    def step(self, batch: FeatureBatch) -> StepOutput:
        raise NotImplementedError

    # ---- shared ----------------------------------------------------------------------------
    @classmethod
    def parse_hparams(cls, hp: dict) -> tuple[Any, FeatureDims]:
        return cls.config_cls(**hp["selector"]), FeatureDims.from_dict(hp["dims"])

    def train_test_gap(self, features: torch.Tensor, prompt: list[str], target: list[str], tau: float,
                       seed: int = 0) -> Optional[Dict[str, torch.Tensor]]:
        """Per-sample measures of how the selection it trains under differs from the hard top-K it
        is deployed with (an objective with a soft selection overrides this; see vp_noise)."""
        return None

    def tau_at(self, step: int) -> Optional[float]:
        """The relaxation's temperature at optimiser step ``step``, when the objective anneals one."""
        return None

    @property
    def objective_vlm(self) -> Optional[nn.Module]:
        """The frozen VLM this objective's loss runs through (passed to
        :meth:`SelectorNet.objective_loss`), if it has one."""
        return None

    def select(self, features: torch.Tensor, budget: int | float, *,
               context: Optional[SelectionContext] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.select(features, budget, context=context)

    def training_step(self, batch: FeatureBatch, batch_idx: int) -> torch.Tensor:
        out = self.step(batch)
        for name, value in out.scalars.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False,
                     prog_bar=name in self.prog_bar_scalars, batch_size=len(batch))
        return out.loss

    def validation_step(self, batch: FeatureBatch, batch_idx: int) -> None:
        out = self.step(batch)
        n = len(batch) if out.n is None else out.n
        for name in self.scalar_names:
            if n:
                self.val_scalars[name].update(out.scalars[name].detach(), weight=n)
            self.log(f"val/{name}", self.val_scalars[name], on_step=False, on_epoch=True,
                     prog_bar=name in self.prog_bar_scalars)
        self.val_samples.update(len(batch))
        self.log("val/samples", self.val_samples, on_step=False, on_epoch=True)

    @torch.no_grad()
    def visualise(self, batch: FeatureBatch, max_images: int = 4) -> PanelView:
        """What a panel draws of the first ``max_images`` samples. A net trained for a budget
        (:attr:`SelectorNet.trained_budget`) is shown as it is deployed: its top-K at that budget,
        and the image reconstructed from those K (when it reconstructs); the objective's step is
        not run. Otherwise the objective's eval-mode step: its keep mask (gumbel_ae's noiseless
        gate, Eq. 3 without noise) and reconstruction."""
        was_training = self.training
        self.eval()
        try:
            head = batch.head(max_images)
            budget = self.net.trained_budget
            if budget is None:
                out = self.step(head)
                return PanelView(keep=out.keep, recon=out.recon)
            keep = keep_mask(self.net.select(head.features, budget)[0], head.features.shape[1])
            return PanelView(keep=keep, recon=self.net.image_from_kept(head.features, keep))
        finally:
            self.train(was_training)

    def configure_optimizers(self):
        cfg = self.optim_config
        params = [p for p in self.parameters() if p.requires_grad]
        opt_cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        optimizer = opt_cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total, cfg))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
