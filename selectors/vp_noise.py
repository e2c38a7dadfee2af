"""``vp_noise``: AutoSelect / DiffPrune, trained only by a frozen VLM's next-token loss.

AutoSelect: *The Model Knows Which Tokens Matter: Automatic Token Selection via Noise Gating*
(arXiv 2603.07135); DiffPrune: *Beyond Surrogate Gradients: Fully Differentiable Token Pruning for
Vision-Language Models* (arXiv 2605.28051), whose Sec. 4 gives the method's details; equation
numbers are DiffPrune's. Per batch of frozen patch tokens X (Eq. 2):

1. the Scorer S (``depth`` Transformer blocks + a linear head) gives one logit per token;
2. the budgeted soft top-K gives weights ``alpha = Phi_K(S(X) / tau)`` with ``sum(alpha) = K``
   exactly (Eq. 4, LapSum form), ``tau`` cosine-annealed 2.0 -> 0.1 over 2000 steps;
3. the variance-preserving noise gate ``sqrt(alpha) * x + sqrt(1 - alpha) * eps`` (Eq. 5),
   with fresh ``eps ~ N(0, I)`` every step;
4. the Denoiser, one Transformer block with a diagonal attention mask (each token sees only
   itself), zero-initialised so it starts as the identity;
5. the frozen VLM (``selector.vlm``) turns the N denoised tokens into the NTP loss of the
   caption (COCO) or of the answer given the question (DocVQA, ChartQA). That loss is the only
   objective: no budget or auxiliary loss.

Inference keeps the hard top-K tokens by the Scorer's logits and gathers the original, un-noised
tokens in positional order; no noise and no Denoiser (``select`` of every selector).

Where the paper is silent (each is a ``selector.*`` key):

- ``gate_norm="standardize"``: Eq. 5 assumes "normalized visual tokens"; patch features are not
  unit-variance, so tokens are standardised per channel with running statistics (an EMA of the
  training batches, ``gate_momentum``) before the gate and de-standardised after it.
  ``gate_norm="none"`` applies Eq. 5 to the raw tokens.
- ``keep_ratio=0.25`` (or ``k``, a count, which wins): the budget K per image; the paper trains
  at K in {64, 128, 192} of 576.
- ``width=None``: the Scorer runs at the feature width (1024 for LLaVA's CLIP-L, as the paper).
- Samples with empty text are skipped and counted (``data/empty_text``).
- The optimiser defaults are the paper's (DiffPrune App. A: AdamW, lr 2e-4, cosine decay) plus a
  3 % warm-up (not given), in ``VPNoiseConfig.optim_defaults``, so they hold under any YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from tokensel.datamodules.batch import FeatureBatch, FeatureDims
from tokensel.common.errors import TokenselError
from tokensel.selectors.base import SelectorConfig, SelectorModule, StepOutput, check_all
from tokensel.selectors.blocks import DiagonalDenoiser, TransformerStack
from tokensel.selectors.budget import BudgetError, alpha_entropy, cosine_tau, soft_topk, vp_noise_gate
from tokensel.selectors.inference import SelectionContext, SelectorNet, gather_tokens, topk_positions
from tokensel.selectors.metrics import kept_indices
from tokensel.selectors.registry import register_selector
from tokensel.selectors.vlm import VLMConfig
from tokensel.selectors.vlm_backends import build_vlm, required_encoder

GATE_NORMS = ("standardize", "none")


@dataclass
class VPNoiseConfig(SelectorConfig):
    """``selector.*`` for vp_noise."""

    optim_defaults: ClassVar[dict] = {"name": "adamw", "lr": 2e-4, "schedule": "cosine", "warmup": 0.03}
    name: str = "vp_noise"
    depth: int = 2  # Scorer Transformer blocks (the paper: 2)
    width: Optional[int] = None  # None: the feature width (the paper: 1024 = CLIP-L)
    head_dim: int = 64  # 1024 / 64 = 16 heads, as the paper
    mlp_ratio: float = 4.0
    k: Optional[int] = None  # tokens kept per image; wins over keep_ratio
    keep_ratio: float = 0.25
    tau_start: float = 2.0
    tau_end: float = 0.1
    tau_steps: int = 2000
    gate_norm: str = "standardize"  # "standardize" | "none"
    gate_momentum: float = 0.01
    denoiser: bool = True  # False: the ablation without the Denoiser
    vlm: VLMConfig = field(default_factory=VLMConfig)

    def __post_init__(self) -> None:
        if isinstance(self.vlm, dict):  # rebuilt from a checkpoint's hyper-parameters
            self.vlm = VLMConfig(**self.vlm)
        checks = [
            (self.depth >= 1, f"selector.depth={self.depth}: must be at least 1"),
            (self.k is None or self.k >= 1, f"selector.k={self.k}: must be at least 1"),
            (0.0 < self.keep_ratio < 1.0, f"selector.keep_ratio={self.keep_ratio}: need 0 < ratio < 1"),
            (self.tau_start > 0 and self.tau_end > 0, "selector.tau_start and selector.tau_end must be positive"),
            (self.tau_steps >= 1, f"selector.tau_steps={self.tau_steps}: must be at least 1"),
            (self.gate_norm in GATE_NORMS, f"selector.gate_norm={self.gate_norm!r}: expected one of {', '.join(GATE_NORMS)}"),
            (0.0 < self.gate_momentum <= 1.0, f"selector.gate_momentum={self.gate_momentum}: need 0 < m <= 1"),
        ]
        check_all(checks)

    def budget(self, num_tokens: int) -> int:
        """K for ``num_tokens`` tokens: ``k`` if set, else ``round(keep_ratio * N)``. Stricter than
        :func:`~tokensel.selectors.budget.resolve_budget`: the soft top-K needs 0 < K < N, so a
        ratio is never rounded up to one token."""
        k = self.k if self.k is not None else round(self.keep_ratio * num_tokens)
        if not 0 < k < num_tokens:
            raise BudgetError(f"selector.k={k}: vp_noise needs 0 < K < N={num_tokens} tokens")
        return k

    def check_run(self, run_config: Any, encoder_weights: Optional[Callable[[], str]] = None) -> Optional[str]:
        """The backend's encoder must be the run's encoder, weights included when the VLM records
        them (a corpus teacher): a one-line reason if not. ``encoder_weights`` gives the run
        encoder's weights identity; the experiments layer passes it (a selector cannot compute it),
        and it is called only when the VLM asks for weights."""
        try:
            need = required_encoder(self.vlm)
        except TokenselError as err:
            return str(err)
        enc = run_config.encoder
        weights = encoder_weights() if need.weights is not None and encoder_weights is not None else None
        reason = need.mismatch(enc.name, enc.layer, enc.norm, weights, enc.image_size)
        if reason:
            return f"selector.vlm={self.vlm.backend}:{self.vlm.model} ({self.vlm.pretrained or 'random'}) needs {reason}"
        return None


class TokenScorer(SelectorNet):
    """The Scorer S: Transformer blocks with global attention, then one logit per token."""

    def __init__(self, cfg: VPNoiseConfig, dims: FeatureDims):
        super().__init__()
        self.config, self.dims = cfg, dims
        width = cfg.width or dims.dim
        self.proj = nn.Linear(dims.dim, width) if width != dims.dim else nn.Identity()
        self.blocks = TransformerStack(width, cfg.depth, cfg.head_dim, cfg.mlp_ratio)
        self.head = nn.Linear(width, 1)

    def scores(self, features: torch.Tensor, context: Optional[SelectionContext] = None) -> torch.Tensor:
        return self.head(self.blocks(self.proj(features))).squeeze(-1)

    @property
    def sampler_layers(self) -> int:
        return self.config.depth

    @property
    def vlm_config(self) -> VLMConfig:
        return self.config.vlm

    @property
    def trained_budget(self) -> float:
        return self.config.budget(self.dims.num_tokens) / self.dims.num_tokens

    def objective_loss(self, batch: FeatureBatch, keep: torch.Tensor, vlm=None) -> Optional[torch.Tensor]:
        """The frozen VLM's NTP loss (Eq. 2's objective, as deployed: the kept tokens gathered in
        positional order, no gate) per sample; NaN for samples with empty text. ``keep`` must keep
        the same number of tokens in every row."""
        if vlm is None:
            return None
        loss = vlm.ntp_loss(gather_tokens(batch.features, kept_indices(keep)), batch.prompt, batch.target).per_sample
        empty = torch.tensor([not text.strip() for text in batch.target], device=loss.device)
        return loss.masked_fill(empty, float("nan"))


class RunningStandardizer(nn.Module):
    """Per-channel running mean/std of the training tokens (EMA), to put Eq. 5 on unit scale."""

    def __init__(self, dim: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        m = 1.0 if self.seen == 0 else self.momentum
        self.mean.lerp_(flat.mean(0), m)
        self.var.lerp_(flat.var(0, unbiased=False), m)
        self.seen += 1

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.var.clamp_min(1e-8).sqrt()

    def restore(self, u: torch.Tensor) -> torch.Tensor:
        return u * self.var.clamp_min(1e-8).sqrt() + self.mean


@register_selector("vp_noise", VPNoiseConfig)
class VPNoiseSelector(SelectorModule):
    """AutoSelect / DiffPrune (see the module docstring)."""

    config_cls = VPNoiseConfig
    scalar_names = ("loss", "ntp_topk", "ntp_full", "ntp_soft", "alpha_on_topk", "keep_ratio")
    prog_bar_scalars = ("loss", "tau")

    def __init__(self, selector: dict, dims: dict, optim: Optional[dict] = None, config: Optional[dict] = None):
        super().__init__(selector, dims, optim, config)
        cfg = self.config
        self.k = cfg.budget(self.dims.num_tokens)
        self.denoiser = DiagonalDenoiser(self.dims.dim, cfg.head_dim, cfg.mlp_ratio) if cfg.denoiser else nn.Identity()
        self.standardizer = RunningStandardizer(self.dims.dim, cfg.gate_momentum)
        self.vlm = build_vlm(cfg.vlm)  # frozen; never in the optimizer or the checkpoint
        self.strict_loading = False  # checkpoints leave the VLM out
        self.empty_text = 0

    @classmethod
    def build_net(cls, config: VPNoiseConfig, dims: FeatureDims) -> TokenScorer:
        return TokenScorer(config, dims)

    @property
    def objective_vlm(self) -> nn.Module:
        return self.vlm

    def tau(self) -> float:
        return self.tau_at(self.global_step)

    def tau_at(self, step: int) -> float:
        cfg = self.config
        return cosine_tau(step, cfg.tau_start, cfg.tau_end, cfg.tau_steps)

    def throttle(self, features: torch.Tensor, alpha: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """VP noise gate (Eq. 5) on standardised tokens, then the diagonal Denoiser. ``noise``:
        the gate's ``eps`` (default: fresh)."""
        if self.config.gate_norm == "none":
            gated = vp_noise_gate(features, alpha, noise)
        else:
            if self.training:
                self.standardizer.update(features)
            gated = self.standardizer.restore(vp_noise_gate(self.standardizer.standardize(features), alpha, noise))
        return self.denoiser(gated)

    @torch.no_grad()
    def train_test_gap(self, features: torch.Tensor, prompt: list[str], target: list[str], tau: float,
                       seed: int = 0) -> dict[str, torch.Tensor]:
        """How far the selection it is trained under is from the one it is deployed with, per
        sample ``(B,)``: ``alpha_on_topk``, the share of the soft top-K mass ``alpha`` (Eq. 4, at
        temperature ``tau``) that falls on the hard top-K; ``ntp_soft``, the VLM's NTP with all
        tokens through the gate and Denoiser as in training (``eps`` from ``seed``); ``ntp_hard``,
        its NTP with the hard top-K tokens gathered, as deployed; ``tokens``, the target tokens
        each NTP averages over."""
        scores = self.net.scores(features)
        alpha = soft_topk(scores, self.k, tau)
        top = topk_positions(scores, self.k)
        on_top = alpha.gather(1, top).sum(dim=1) / self.k
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(features.shape, generator=generator).to(features.device, torch.float32)
        soft = self.vlm.ntp_loss(self.throttle(features, alpha, noise), prompt, target)
        hard = self.vlm.ntp_loss(gather_tokens(features, top), prompt, target)
        return {"alpha_on_topk": on_top, "ntp_soft": soft.per_sample, "ntp_hard": hard.per_sample,
                "tokens": hard.tokens}

    def step(self, batch: FeatureBatch) -> StepOutput:
        keep = [i for i, text in enumerate(batch.target) if text.strip()]
        if len(keep) < len(batch):
            self.empty_text += len(batch) - len(keep)
            self.log("data/empty_text", float(self.empty_text), on_step=True, on_epoch=False, batch_size=len(batch))
        features = batch.features[keep]
        prompt = [batch.prompt[i] for i in keep]
        target = [batch.target[i] for i in keep]
        scores = self.net.scores(features) if keep else batch.features.new_zeros(0, self.dims.num_tokens)
        tau = self.tau()
        keep_ratio = torch.tensor(self.k / self.dims.num_tokens, device=features.device)
        hard = torch.zeros(len(batch), self.dims.num_tokens, device=features.device)
        if keep:
            hard[keep] = torch.zeros_like(scores).scatter_(1, topk_positions(scores.detach(), self.k), 1.0)
        if not keep:  # nothing to learn from: a zero loss that still touches the parameters (DDP)
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            names = ("loss", "ntp", "tau") if self.training else self.scalar_names
            return StepOutput(zero, {name: zero.detach() for name in names}, keep=hard, n=0)
        if self.training:
            alpha = soft_topk(scores, self.k, tau)
            ntp = self.vlm.ntp_loss(self.throttle(features, alpha), prompt, target).loss
            scalars = {"loss": ntp, "ntp": ntp, "tau": torch.tensor(tau), "keep_ratio": keep_ratio,
                       "alpha_entropy": alpha_entropy(alpha.detach())}
            return StepOutput(ntp, scalars, keep=alpha.detach(), n=len(keep))
        indices = topk_positions(scores, self.k)  # where the kept tokens sit (Qwen-VL's M-RoPE ids)
        ntp_topk = self.vlm.ntp_loss(gather_tokens(features, indices), prompt, target, indices=indices).loss
        ntp_full = self.vlm.ntp_loss(features, prompt, target).loss
        gap = self.train_test_gap(features, prompt, target, tau)
        tokens = gap["tokens"].to(gap["ntp_soft"].dtype)
        ntp_soft = (gap["ntp_soft"] * tokens).sum() / tokens.sum().clamp_min(1)  # token-weighted, as ntp_topk
        scalars = {"loss": ntp_topk, "ntp_topk": ntp_topk, "ntp_full": ntp_full, "ntp_soft": ntp_soft,
                   "alpha_on_topk": gap["alpha_on_topk"].mean(), "keep_ratio": keep_ratio}
        return StepOutput(ntp_topk, scalars, keep=hard, n=len(keep))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("vlm.")}
