"""``gumbel_ae`` and ``straight_through``: the auto-encoder selector of *Adaptive Vision Token
Selection for Multi-Modal Inference* (arXiv 2503.16660), Sections 3–4.

The Feature Selector S (``depth`` Transformer layers and a
two-way keep head) gives a hard keep mask M; dropped tokens become one shared learnable
``E_masked`` (Eq. 5); the Feature Reconstructor R^f (4 layers) restores F^rec and the Image
Reconstructor R^im decodes I^rec from it (Eq. 6). The loss is Eq. 8::

    dist(F^rec, F) + dist(I^rec, I) + alpha1 * max(L_pr, p) - alpha2 * min(L_pr, q)

with ``L_pr = mean(M)`` (Eq. 7), p=0.6, q=0.1, alpha1=alpha2=0.1.

``straight_through`` (App. B.1) is the same objective with the plain straight-through
estimator (no Gumbel noise): a registry entry that changes one default, not a second class.
Either takes ``regulariser=maxmin`` (Eq. 4, default) or ``plain`` (alpha1 * L_pr), so the four
configurations of App. B.1 all run.

Where the paper is silent (each is a ``selector.*`` key):

- ``tau=1.0``: the softmax temperature of the relaxation.
- ``distance="mse"``: "the l2 norm" of Sec. 4.4 as the mean squared error; ``"l2"`` takes the
  mean over tokens (pixels) of the Euclidean norm over channels instead.
- ``width=None``: the selector and reconstructor run at the feature width C.
- The reconstructor adds a fixed 2-D sine-cosine position embedding to its input, since
  ``E_masked`` tokens carry no position of their own (as MAE's decoder does).
- Validation uses the noiseless mask (the argmax of the logits): Gumbel noise is a training
  device, and inference ranks the same logits.
- ``keep_ratio_reduction="batch"``: Eq. 7 defines ``L_pr`` for one image, and Eq. 8 is written
  for one image. We apply the regulariser to the batch mean of ``L_pr`` by default, so that one
  image may keep more tokens than ``p`` and another fewer than ``q`` as long as the batch stays
  in the band: the paper's selector is *adaptive* (the number of kept tokens follows the image's
  content), and a per-image band would force every image into ``[q, p]``.
  ``keep_ratio_reduction="image"`` applies Eq. 8's term to each image's ``L_pr`` and averages.

Budget-matched training (``selector.budget``; tokensel's recipe, off in the paper presets):
strictly inside ``(q, p)`` the max/min term of Eq. 4 has no gradient, so under the paper's
band the selector is trained only to tell the tokens it keeps (about ``p`` of them, or more when
alpha1 cannot pull the ratio down) from the rest, never to rank the best K of a smaller eval
budget. ``budget=b`` puts the band at ``[b - budget_band/2, b + budget_band/2]`` with
``alpha1 = alpha2 = budget_alpha`` on each image's ``L_pr`` (``keep_ratio_reduction="image"``),
so every image's sampled mask is pulled to ``b``; explicit ``p``, ``q``, ``alpha1``, ``alpha2``
or ``keep_ratio_reduction`` still win. ``make eval`` scores such a checkpoint at ``b``
(:attr:`TokenAutoEncoder.trained_budget`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from tokensel.datamodules.batch import FeatureBatch, FeatureDims
from tokensel.selectors.base import SelectorConfig, SelectorModule, StepOutput, check_all
from tokensel.selectors.blocks import ImageDecoder, KeepHead, TransformerStack, sincos_2d
from tokensel.selectors.budget import (ESTIMATORS, KEEP_RATIO_REDUCTIONS, REGULARISERS, binary_keep_mask,
                                       budget_regulariser, keep_ratio, replace_dropped)
from tokensel.selectors.inference import SelectionContext, SelectorNet
from tokensel.selectors.registry import register_selector

DISTANCES = ("mse", "l2")


@dataclass
class GumbelAEConfig(SelectorConfig):
    """``selector.*`` for gumbel_ae and straight_through."""

    name: str = "gumbel_ae"
    depth: int = 4  # Feature Selector Transformer layers (Sec. 4.1.1; Fig. 4 sweeps 1-8)
    reconstructor_depth: int = 4  # Feature Reconstructor layers (Sec. 4.2)
    image_decoder_depth: int = 2  # Image Reconstructor Transformer layers (Sec. 4.2)
    image_decoder_channels: int = 128
    # Width of the three Transformers (selector, reconstructor, image decoder); None: the feature width C
    # (the paper's). Narrower stacks get a linear map in and out; the reconstruction targets stay C wide.
    width: Optional[int] = None
    head_dim: int = 64
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    estimator: str = "gumbel"  # "gumbel" | "straight_through" (App. B.1)
    tau: float = 1.0
    regulariser: str = "maxmin"  # "maxmin" (Eq. 4) | "plain" (alpha1 * L_pr)
    # Budget-matched training: the keep ratio the selector is trained for. None: the paper's band.
    budget: Optional[float] = None
    budget_band: float = 0.05  # width of [q, p] around the budget
    budget_alpha: float = 2.0  # alpha1 = alpha2 with a budget
    # Unset (None): the paper's values (p=0.6, q=0.1, alpha=0.1, batch) or, with a budget, derived from it.
    keep_ratio_reduction: Optional[str] = None  # "batch": the regulariser on the batch mean of L_pr | "image"
    p: Optional[float] = None
    q: Optional[float] = None
    alpha1: Optional[float] = None
    alpha2: Optional[float] = None
    feature_weight: float = 1.0
    image_weight: float = 1.0
    distance: str = "mse"  # "mse" | "l2"

    def __post_init__(self) -> None:
        check_all([(self.budget is None or 0.0 < self.budget < 1.0,
                    f"selector.budget={self.budget}: a keep ratio in (0, 1), or null for the paper's band"),
                   (0.0 < self.budget_band < 1.0, f"selector.budget_band={self.budget_band}: need 0 < band < 1"),
                   (self.budget_alpha > 0, f"selector.budget_alpha={self.budget_alpha}: must be positive")])
        band = self.band()  # unset keys stay None in the config: they follow the budget wherever it is set
        checks = [
            (self.estimator in ESTIMATORS, f"selector.estimator={self.estimator!r}: expected one of {', '.join(ESTIMATORS)}"),
            (self.regulariser in REGULARISERS, f"selector.regulariser={self.regulariser!r}: expected one of {', '.join(REGULARISERS)}"),
            (self.distance in DISTANCES, f"selector.distance={self.distance!r}: expected one of {', '.join(DISTANCES)}"),
            (band["keep_ratio_reduction"] in KEEP_RATIO_REDUCTIONS, f"selector.keep_ratio_reduction="
             f"{band['keep_ratio_reduction']!r}: expected one of {', '.join(KEEP_RATIO_REDUCTIONS)}"),
            (self.depth >= 1, f"selector.depth={self.depth}: must be at least 1"),
            (self.reconstructor_depth >= 1, f"selector.reconstructor_depth={self.reconstructor_depth}: must be at least 1"),
            (self.image_decoder_depth >= 0, f"selector.image_decoder_depth={self.image_decoder_depth}: must be >= 0"),
            (0.0 <= band["q"] < band["p"] <= 1.0, f"selector.q={band['q']}, selector.p={band['p']}: need 0 <= q < p <= 1"),
            (self.tau > 0, f"selector.tau={self.tau}: must be positive"),
            (self.width is None or self.width % 4 == 0, f"selector.width={self.width}: must be divisible by 4"),
        ]
        check_all(checks)

    def band(self) -> dict:
        """The regulariser's settings in effect (``p``, ``q``, ``alpha1``, ``alpha2``,
        ``keep_ratio_reduction``): each set key as set; each unset (None) one the paper's (Eq. 8:
        p=0.6, q=0.1, alpha1=alpha2=0.1, on the batch mean) or, with a ``budget``, the band
        ``[budget - band/2, budget + band/2]`` with ``alpha1 = alpha2 = budget_alpha`` on each
        image's L_pr, so that every image's noisy mask is pulled to the budget. Resolved here, not
        stored, so a budget set by a later config layer still moves them."""
        if self.budget is None:
            derived = {"p": 0.6, "q": 0.1, "alpha1": 0.1, "alpha2": 0.1, "keep_ratio_reduction": "batch"}
        else:
            half = self.budget_band / 2
            derived = {"p": round(min(1.0, self.budget + half), 6), "q": round(max(0.0, self.budget - half), 6),
                       "alpha1": self.budget_alpha, "alpha2": self.budget_alpha, "keep_ratio_reduction": "image"}
        return {key: derived[key] if getattr(self, key) is None else getattr(self, key) for key in derived}


def reconstruction_distance(pred: torch.Tensor, target: torch.Tensor, kind: str, channel_dim: int) -> torch.Tensor:
    """``dist`` of Eq. 3 per sample ``(B,)``: the mean squared error, or the mean Euclidean norm
    over ``channel_dim``, over each sample's tokens (pixels). Every sample has the same size, so
    the batch mean of this is the batch's ``dist``."""
    diff = pred.float() - target.float()
    if kind == "mse":
        return diff.square().flatten(1).mean(dim=1)
    return diff.norm(dim=channel_dim).flatten(1).mean(dim=1)


class TokenAutoEncoder(SelectorNet):
    """S, E_masked, R^f and R^im as one plain module (Fig. 2). ``scores`` is all inference needs."""

    def __init__(self, cfg: GumbelAEConfig, dims: FeatureDims):
        super().__init__()
        self.config, self.dims = cfg, dims
        c = dims.dim
        width = cfg.width or c

        def to_width() -> nn.Module:
            return nn.Linear(c, width) if width != c else nn.Identity()

        # Feature Selector S
        self.selector_in = to_width()
        self.selector = TransformerStack(width, cfg.depth, cfg.head_dim, cfg.mlp_ratio, cfg.dropout)
        self.keep_head = KeepHead(width)
        # E_masked: one learnable token shared by every dropped position
        self.masked_embedding = nn.Parameter(torch.randn(c) * 0.02)
        # Feature Reconstructor R^f
        self.reconstructor_in = to_width()
        self.register_buffer("position", sincos_2d(dims.grid, width), persistent=False)
        self.reconstructor = TransformerStack(width, cfg.reconstructor_depth, cfg.head_dim, cfg.mlp_ratio, cfg.dropout)
        self.reconstructor_out = nn.Linear(width, c)
        # Image Reconstructor R^im
        self.image_decoder = ImageDecoder(c, dims.grid, dims.image_size, cfg.image_decoder_depth,
                                          cfg.image_decoder_channels, cfg.head_dim, width=width)

    def keep_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, 2) drop/keep logits of the Feature Selector."""
        return self.keep_head(self.selector(self.selector_in(features)))

    def scores(self, features: torch.Tensor, context: Optional[SelectionContext] = None) -> torch.Tensor:
        return KeepHead.score(self.keep_logits(features))

    @property
    def sampler_layers(self) -> int:
        return self.config.depth

    @property
    def trained_budget(self) -> Optional[float]:
        return self.config.budget

    def objective_loss(self, batch: FeatureBatch, keep: torch.Tensor, vlm=None) -> torch.Tensor:
        """Eq. 8 without its budget term, per sample: the feature and image reconstruction of the
        kept tokens, the dropped ones replaced by ``E_masked`` (Eq. 5-6)."""
        cfg = self.config
        f_rec, i_rec = self.reconstruct(replace_dropped(batch.features, keep.float(), self.masked_embedding))
        feat = reconstruction_distance(f_rec, batch.features, cfg.distance, channel_dim=-1)
        img = reconstruction_distance(i_rec, batch.image, cfg.distance, channel_dim=1)
        return cfg.feature_weight * feat + cfg.image_weight * img

    def image_from_kept(self, features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``I^rec`` from the kept tokens alone, the dropped ones replaced by ``E_masked`` (Eq. 5-6)."""
        return self.reconstruct(replace_dropped(features, keep.float(), self.masked_embedding))[1].clamp(0, 1)

    def reconstruct(self, selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6: ``F^rec = R^f(F^pr)``, ``I^rec = R^im(F^rec)``."""
        x = self.reconstructor_in(selected) + self.position.to(selected.dtype)
        f_rec = self.reconstructor_out(self.reconstructor(x))
        return f_rec, self.image_decoder(f_rec)


@register_selector("straight_through", GumbelAEConfig, estimator="straight_through")
@register_selector("gumbel_ae", GumbelAEConfig)
class GumbelAESelector(SelectorModule):
    """The auto-encoder objective of Eq. 8 (see the module docstring)."""

    config_cls = GumbelAEConfig
    scalar_names = ("loss", "feat_recon", "img_recon", "keep_ratio", "keep_prob", "reg")
    prog_bar_scalars = ("loss", "keep_ratio")

    @classmethod
    def build_net(cls, config: GumbelAEConfig, dims: FeatureDims) -> TokenAutoEncoder:
        return TokenAutoEncoder(config, dims)

    def step(self, batch: FeatureBatch) -> StepOutput:
        cfg, net = self.config, self.net
        features = batch.features
        logits = net.keep_logits(features)
        mask = binary_keep_mask(logits, cfg.estimator, cfg.tau, noise=self.training)
        f_rec, i_rec = net.reconstruct(replace_dropped(features, mask, net.masked_embedding))
        feat = reconstruction_distance(f_rec, features, cfg.distance, channel_dim=-1).mean()
        img = reconstruction_distance(i_rec, batch.image, cfg.distance, channel_dim=1).mean()
        l_pr = keep_ratio(mask)
        band = cfg.band()
        per_image = keep_ratio(mask, per_image=True) if band["keep_ratio_reduction"] == "image" else l_pr
        reg = budget_regulariser(per_image, cfg.regulariser, band["p"], band["q"], band["alpha1"], band["alpha2"])
        loss = cfg.feature_weight * feat + cfg.image_weight * img + reg
        keep_prob = torch.softmax(logits.float(), dim=-1)[..., 1].mean()
        scalars = {"loss": loss, "feat_recon": feat, "img_recon": img, "keep_ratio": l_pr,
                   "keep_prob": keep_prob, "reg": reg}
        return StepOutput(loss, scalars, keep=mask.detach(), recon=i_rec.detach().clamp(0, 1))
