"""RL loss and advantage math for align: pure torch functions, no model code.

Conventions used throughout:

* Token tensors are ``[batch, time]`` (``B × T``) and cover the *response* tokens only.
* ``mask`` is a bool or 0/1 tensor of the same shape: nonzero = real response token, zero = padding.
  Fractional weights are not supported (any nonzero entry counts as 1).
* Padding positions never influence a result, even when they hold NaN/inf (e.g. garbage log-probs
  of pad tokens): every function selects with ``torch.where`` before arithmetic, and the losses zero
  their inputs at padding first so that gradients there are exactly 0 rather than ``0 * nan``.
* Outputs that are per token are 0 at padding.
* Targets (advantages, returns, old log-probs, old values, rewards) are detached inside the
  functions that consume or produce them: they are constants of the PPO objective, and a gradient
  leaking into them is a silent, common bug.
* Whitening and other batch statistics are computed on the local batch only; under data parallel
  each rank whitens its own shard (as TRL ≤1.12 does). All-reduce the sums yourself for global stats.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLKind",
    "RunningMoments",
    "clip_scores",
    "compute_gae",
    "entropy_from_logits",
    "explained_variance",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "policy_loss",
    "value_loss",
]

KLKind = Literal["k1", "k2", "k3", "abs"]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _check_same_shape(**tensors: Tensor) -> None:
    # Off-by-one time axes ([B, T] vs [B, T+1]) would otherwise broadcast or fail deep inside.
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def _bool_mask(mask: Tensor, like: Tensor) -> Tensor:
    return torch.broadcast_to(mask != 0, like.shape)


# --------------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------------


def masked_sum(
    x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False
) -> Tensor:
    """Sum of ``x`` over real positions: ``Σ_i x_i · [mask_i ≠ 0]``.

    Args:
        x: any shape, floating point.
        mask: broadcastable to ``x``; nonzero = real.
        dim: dimension(s) to reduce; ``None`` reduces everything to a scalar.

    Returns:
        Reduced tensor. Padding values (even NaN/inf) are ignored.
    """
    m = _bool_mask(mask, x)
    picked = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return picked.sum()
    return picked.sum(dim=dim, keepdim=keepdim)


def masked_mean(
    x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False
) -> Tensor:
    """Mean of ``x`` over real positions: ``Σ x·m / Σ m``.

    Args:
        x: any shape, floating point.
        mask: broadcastable to ``x``; nonzero = real.
        dim: dimension(s) to reduce; ``None`` reduces everything to a scalar.

    Returns:
        Reduced tensor. Where a slice has no real position the mean is defined as 0 (not NaN), so a
        fully padded row cannot poison a loss.
    """
    m = _bool_mask(mask, x)
    total = masked_sum(x, m, dim=dim, keepdim=keepdim)
    count = m.sum() if dim is None else m.sum(dim=dim, keepdim=keepdim)
    count = count.to(x.dtype)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def masked_var(
    x: Tensor,
    mask: Tensor,
    unbiased: bool = True,
    dim: int | tuple[int, ...] | None = None,
    keepdim: bool = False,
) -> Tensor:
    """Variance of ``x`` over real positions.

    ``var = Σ m·(x − μ)² / n`` with ``μ = masked_mean(x)`` and ``n = Σ m``; multiplied by the Bessel
    correction ``n / (n − 1)`` when ``unbiased``.

    Args:
        x: any shape, floating point.
        mask: broadcastable to ``x``; nonzero = real.
        unbiased: apply Bessel's correction (TRL's and torch's default).
        dim: dimension(s) to reduce; ``None`` = everything.

    Returns:
        Reduced tensor. Defined as 0 when there are too few real positions (``n = 0``, or ``n = 1``
        with ``unbiased``) instead of NaN/raising: computed with ``where``, so no host sync on GPU.
    """
    m = _bool_mask(mask, x)
    mean = masked_mean(x, m, dim=dim, keepdim=True)
    centered_sq = (x - mean) ** 2
    var = masked_mean(centered_sq, m, dim=dim, keepdim=keepdim)
    if unbiased:
        n = (m.sum() if dim is None else m.sum(dim=dim, keepdim=keepdim)).to(x.dtype)
        var = torch.where(n > 1, var * n / (n - 1).clamp_min(1), torch.zeros_like(var))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` with statistics over *all* real positions of the batch (advantage whitening).

    ``y = (x − μ) / sqrt(σ² + eps)``; with ``shift_mean=False`` the mean is added back,
    ``y = (x − μ) / sqrt(σ² + eps) + μ`` (only the scale is normalised; TRL uses this for rewards).
    ``μ`` and ``σ²`` (unbiased) are the masked mean / variance over the whole tensor, i.e. global over
    batch and time, as OpenRLHF/veRL/TRL whiten advantages.

    Args:
        x: ``[B, T]`` (any shape works; statistics are always global).
        mask: same shape, nonzero = real.
        shift_mean: keep the result zero-mean (True) or restore the original mean (False).
        eps: added to the variance; guards a constant batch.

    Returns:
        Same shape as ``x``; 0 at padding.
    """
    m = _bool_mask(mask, x)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return torch.where(m, y, torch.zeros_like(y))


# --------------------------------------------------------------------------------------------------
# advantages
# --------------------------------------------------------------------------------------------------


def compute_gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over response tokens.

    For real steps, scanning right to left, with ``t'`` the next *real* step after ``t``::

        δ_t = r_t + γ · V_{t'} − V_t
        A_t = δ_t + γ · λ · A_{t'}
        R_t = A_t + V_t                       (the value-function target)

    ``V_{t'} = A_{t'} = 0`` after the last real token: the episode ends there (bootstrap with 0).

    Masked steps are treated as *absent*: they get ``A = R = 0``, their rewards and values are
    ignored, and they cost no extra discount (the step before a gap links directly to the step after
    it). So right padding, left padding and inner holes (e.g. masked tool-output tokens in a
    multi-turn rollout) are all handled; a reward placed on a masked position is dropped, so put the
    sequence score on a real token (see :func:`per_token_rewards`).

    Args:
        rewards: ``[B, T]`` per-token rewards.
        values: ``[B, T]`` critic values ``V(s_t)`` for each response token.
        mask: ``[B, T]`` response mask, nonzero = real token.
        gamma: discount γ ∈ [0, 1]; 1.0 in every RLHF anchor.
        lam: GAE λ ∈ [0, 1]. 1.0 (OpenRLHF, veRL) gives Monte-Carlo advantages ``Σ r − V`` that do not
            lean on a fresh critic; 0.95 (TRL ≤1.12, DS-Chat, torchtune) lowers variance but
            discounts a terminal score by 0.95^k for a token k steps before the end.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, detached, 0 at padding. Advantages are not
        whitened; use :func:`masked_whiten`.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"compute_gae expects [batch, time] tensors, got {tuple(rewards.shape)}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    rewards = rewards.detach()
    values = values.detach()
    m = mask != 0
    batch, time = rewards.shape
    zero = torch.zeros(batch, dtype=values.dtype, device=values.device)
    next_value = zero
    next_adv = zero
    advantages = torch.zeros_like(values)
    for t in reversed(range(time)):
        real = m[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(real, adv_t, zero)
        # A masked step leaves the carried "next" state untouched, so it is skipped entirely.
        next_value = torch.where(real, values[:, t], next_value)
        next_adv = torch.where(real, adv_t, next_adv)
    returns = torch.where(m, advantages + values, torch.zeros_like(values))
    return advantages, returns


# --------------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------------


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 KL estimator per token: ``logp − ref_logp`` (unbiased for KL(π‖ref), high variance, can be < 0).

    Shapes: any, equal; returns the same shape.
    """
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 KL estimator per token: ``½ (logp − ref_logp)²`` (biased, low variance, ≥ 0).

    Shapes: any, equal; returns the same shape.
    """
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 KL estimator per token (Schulman): with ``d = ref_logp − logp``, ``exp(d) − d − 1``.

    Unbiased for KL(π‖ref) when tokens are sampled from π, always ≥ 0, low variance; the GRPO/veRL
    in-loss KL. ``exp`` can overflow for ``d ≳ 88`` in float32; veRL clamps ``d`` to ±20 for that.

    Shapes: any, equal; returns the same shape.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: KLKind = "k1") -> Tensor:
    """Per-token KL estimate of KL(π‖ref) from log-probs of the sampled tokens.

    ``kind``: ``"k1"`` → :func:`kl_k1`, ``"k2"`` → :func:`kl_k2`, ``"k3"`` → :func:`kl_k3`,
    ``"abs"`` → ``|logp − ref_logp|``.

    Shapes: ``logp``, ``ref_logp`` any equal shape (typically ``[B, T]``); returns the same shape.
    Not masked: padding is handled by the caller (see :func:`per_token_rewards`).
    """
    if kind == "k1":
        return kl_k1(logp, ref_logp)
    if kind == "k2":
        return kl_k2(logp, ref_logp)
    if kind == "k3":
        return kl_k3(logp, ref_logp)
    if kind == "abs":
        return (logp - ref_logp).abs()
    raise ValueError(f"unknown KL kind {kind!r}; expected one of 'k1', 'k2', 'k3', 'abs'")


def clip_scores(scores: Tensor, clip: float | None) -> Tensor:
    """Clip sequence scores to ``[−clip, clip]`` (OpenRLHF ±10, DS-Chat ±5); ``None`` = no-op.

    Shapes: any; returns the same shape.
    """
    if clip is None:
        return scores
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    return scores.clamp(-clip, clip)


def per_token_rewards(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    kl_kind: KLKind = "k1",
    *,
    score_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Classic RLHF per-token reward: a KL penalty on every token plus the score on the last one.

    ::

        kl_t = KL_kind(logp_t, ref_logp_t)                        (0 at padding)
        r_t  = −kl_coef · kl_t + [t = last real token] · score

    "Last real token" is the highest index with a nonzero mask in each row (the EOS, or the final
    token of a truncated response), so right and left padding both work. A row without any real
    token receives nothing. This is the OpenRLHF/veRL placement; TRL ≤1.12 puts the score on the
    token *after* the last one, which is outside the response mask.

    Args:
        scores: ``[B]`` sequence-level rewards (reward model / rule scores, after any no-EOS penalty).
        logp: ``[B, T]`` policy log-probs of the sampled tokens.
        ref_logp: ``[B, T]`` reference-model log-probs of the same tokens.
        mask: ``[B, T]`` response mask.
        kl_coef: β, a float or 0-dim tensor (e.g. ``AdaptiveKLController.value``).
        kl_kind: KL estimator, default k1 as in OpenRLHF/TRL.
        score_clip: clip scores to ``±score_clip`` first (:func:`clip_scores`).

    Returns:
        ``(rewards, kl)``: both ``[B, T]``, detached, 0 at padding. ``kl`` is the per-token estimate
        for logging (e.g. ``masked_sum(kl, mask, dim=1).mean()`` is the mean sequence KL).
    """
    _check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    if logp.dim() != 2 or scores.shape != (logp.shape[0],):
        raise ValueError(
            f"expected scores [B] and token tensors [B, T], got {tuple(scores.shape)} and {tuple(logp.shape)}"
        )
    m = mask != 0
    logp = torch.where(m, logp.detach(), 0.0)
    ref_logp = torch.where(m, ref_logp.detach(), 0.0)
    kl = torch.where(m, kl_penalty(logp, ref_logp, kl_kind), 0.0)
    if isinstance(kl_coef, Tensor):
        kl_coef = kl_coef.detach()
    rewards = -kl_coef * kl
    scores = clip_scores(scores.detach(), score_clip).to(rewards.dtype)

    time = logp.shape[1]
    positions = torch.arange(time, device=logp.device).expand_as(m)
    last = torch.where(m, positions, -1).amax(dim=1)
    has_token = last >= 0
    rewards = rewards.scatter_add(
        1, last.clamp_min(0).unsqueeze(1), torch.where(has_token, scores, 0.0).unsqueeze(1)
    )
    return rewards, kl


class FixedKLController:
    """Constant KL coefficient β; same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value: float = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the (unchanged) coefficient."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences").

    After each batch::

        e = clip(current_kl / target − 1, −0.2, 0.2)      (proportional error)
        β ← β · (1 + e · n_steps / horizon)

    ``current_kl`` is the mean *sequence* KL (sum over tokens, mean over samples) in nats;
    ``n_steps`` is how many samples/episodes the batch contained, ``horizon`` how many samples it
    should take to correct a 20 % error (Ziegler: target 6, horizon 10 000).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"need init_kl_coef >= 0, target > 0, horizon > 0; got {init_kl_coef}, {target}, {horizon}"
            )
        self.value: float = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update and return β. ``current_kl`` may be a 0-dim tensor (converted with ``float``)."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# --------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017), with clip-higher and dual-clip options.

    Per real token, with ``ρ = exp(logp − old_logp)``::

        ℓ_clip = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high))
        ℓ      = min(ℓ_clip, c·|A|)   if dual_clip = c and A < 0      (Ye et al. 2020)
        ℓ      = ℓ_clip               otherwise

    then averaged over all real tokens of the batch (token mean: DAPO, TRL's GRPO default "dapo", the
    PPO anchors). ``ε_low = clip_eps``; ``ε_high = clip_eps_high`` or
    ``clip_eps`` (DAPO clip-higher: 0.2 / 0.28). Dual clip bounds the loss of a negative-advantage
    token whose ratio has exploded (veRL default c = 3); where any clip binds the gradient is 0.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (with grad).
        old_logp: ``[B, T]`` log-probs under the behaviour policy (detached inside).
        advantages: ``[B, T]`` per token, or ``[B]`` per sequence (GRPO), detached inside.
        mask: ``[B, T]`` response mask.
        clip_eps: ε_low, > 0.
        clip_eps_high: ε_high; ``None`` → ``clip_eps``.
        dual_clip: c > 1, or ``None`` to disable.

    Returns:
        ``(loss, stats)``. ``stats`` holds detached 0-dim tensors (no host sync), token means over real
        tokens: ``clip_fraction`` (ratio clip binds: ℓ_clip from the clipped term, gradient 0),
        ``dual_clip_fraction`` (dual clip binds; 0 when disabled), ``approx_kl`` (k3 estimate of
        KL(π_old‖π) = ``ρ − 1 − log ρ``), ``ratio_mean``, ``ratio_max``.
    """
    if advantages.dim() == 1 and logp.dim() == 2:
        advantages = advantages.unsqueeze(1).expand_as(logp)
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if eps_low <= 0 or eps_high <= 0:
        raise ValueError(f"clip ranges must be > 0, got low={eps_low}, high={eps_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")

    m = mask != 0
    # Zero inputs at padding first so NaN/inf there cannot reach the gradient as 0 * nan.
    logp = torch.where(m, logp, 0.0)
    old_logp = torch.where(m, old_logp.detach(), 0.0)
    advantages = torch.where(m, advantages.detach(), 0.0)

    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    # Disjoint from dual_hit: for A < 0 the ratio clip binds only when ρ < 1 − ε, where ℓ < c·|A|.
    clip_hit = clipped > unclipped
    if dual_clip is not None:
        bound = -advantages * dual_clip  # = c·|A| where A < 0
        dual_hit = (advantages < 0) & (per_token > bound)
        per_token = torch.where(dual_hit, bound, per_token)
    else:
        dual_hit = torch.zeros_like(clip_hit)

    loss = masked_mean(per_token, m)

    with torch.no_grad():
        ratio_d = ratio.detach()
        stats = {
            "clip_fraction": masked_mean(clip_hit.to(logp.dtype), m),
            "dual_clip_fraction": masked_mean(dual_hit.to(logp.dtype), m),
            "approx_kl": masked_mean(kl_k3(old_logp, logp.detach()), m),
            "ratio_mean": masked_mean(ratio_d, m),
            # ρ > 0, so 0 at padding never wins the max and an all-padding batch reports 0.
            "ratio_max": torch.where(m, ratio_d, 0.0).amax(),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float | None = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (PPO2 / OpenAI baselines), masked token mean.

    ::

        v_clip = old_v + clip(v − old_v, −ε, ε)
        ℓ_t    = ½ · max((v − R)², (v_clip − R)²)          (clip_range = ε)
        ℓ_t    = ½ · (v − R)²                              (clip_range = None)
        loss   = Σ m·ℓ / Σ m

    Anchors: ε = 0.2 (TRL, DS-Chat), 0.5 (OpenRLHF, veRL; rewards there are larger).

    Args:
        values: ``[B, T]`` current critic predictions (with grad).
        old_values: ``[B, T]`` critic predictions at rollout time (detached inside).
        returns: ``[B, T]`` targets from :func:`compute_gae` (detached inside).
        mask: ``[B, T]`` response mask.
        clip_range: ε > 0, or ``None`` for the unclipped loss.

    Returns:
        ``(loss, stats)``; stats (detached 0-dim): ``clip_fraction`` (fraction of real tokens where the
        clipped term is the larger, i.e. gradient 0), ``value_mean``, ``value_error`` (mean (v − R)²).
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip_range is not None and clip_range <= 0:
        raise ValueError(f"clip_range must be > 0 or None, got {clip_range}")
    m = mask != 0
    values = torch.where(m, values, 0.0)
    old_values = torch.where(m, old_values.detach(), 0.0)
    returns = torch.where(m, returns.detach(), 0.0)

    err_unclipped = (values - returns) ** 2
    if clip_range is None:
        per_token = err_unclipped
        clip_hit = torch.zeros_like(m)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        err_clipped = (v_clipped - returns) ** 2
        per_token = torch.maximum(err_unclipped, err_clipped)
        clip_hit = err_clipped > err_unclipped
    loss = 0.5 * masked_mean(per_token, m)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean(clip_hit.to(values.dtype), m),
            "value_mean": masked_mean(values.detach(), m),
            "value_error": masked_mean(err_unclipped.detach(), m),
        }
    return loss, stats


# --------------------------------------------------------------------------------------------------
# logits helpers
# --------------------------------------------------------------------------------------------------


def _rows(x: Tensor, chunk_size: int | None) -> list[Tensor]:
    if chunk_size is None or x.shape[0] <= chunk_size:
        return [x]
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    return list(x.split(chunk_size, dim=0))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 log-softmax loses ~2-3 significant digits, enough to bias PPO ratios.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def logprobs_from_logits(
    logits: Tensor, labels: Tensor, chunk_size: int | None = None, ignore_index: int = -100, temperature: float = 1.0
) -> Tensor:
    """Log-probability of each label: ``log softmax(logits / T)[label] = z[label] − logsumexp(z)``.

    Gathers the label logit and subtracts ``logsumexp`` instead of materialising the full
    ``[..., V]`` log-softmax. bf16/fp16 logits are upcast to float32 one chunk at a time, and divided
    by the sampling ``temperature`` after the upcast (dividing bf16 logits first rounds them again).

    Logits must already be aligned with labels (logits at position t predict ``labels[t]``).

    Args:
        logits: ``[..., V]``, e.g. ``[B, T, V]``.
        labels: ``[...]`` integer token ids, e.g. ``[B, T]``. Entries equal to ``ignore_index`` (or any
            negative id) yield 0.
        chunk_size: process this many flattened positions at a time (caps the float32 temporaries at
            ``chunk_size × V``; useful under ``no_grad``); ``None`` = all at once.
        ignore_index: label value marking positions to skip.
        temperature: the sampling temperature T > 0.

    Returns:
        ``labels.shape`` tensor of log-probs, float32 for half-precision logits, else ``logits.dtype``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    skip = (flat_labels == ignore_index) | (flat_labels < 0)
    safe_labels = torch.where(skip, 0, flat_labels)
    dtype = _compute_dtype(logits.dtype)
    outs = []
    for lg, lb in zip(_rows(flat_logits, chunk_size), _rows(safe_labels, chunk_size), strict=True):
        lg = lg.to(dtype) / temperature
        picked = lg.gather(-1, lb.unsqueeze(-1)).squeeze(-1)
        outs.append(picked - torch.logsumexp(lg, dim=-1))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    out = torch.where(skip, torch.zeros((), dtype=out.dtype, device=out.device), out)
    return out.reshape(labels.shape)


def entropy_from_logits(logits: Tensor, chunk_size: int | None = None, temperature: float = 1.0) -> Tensor:
    """Entropy of the softmax distribution at each position: ``H = −Σ_v p_v · log p_v`` with
    ``p = softmax(logits / T)``.

    ``log p = logits − logsumexp(logits)`` (stable for large logits); ``-inf`` logits (masked
    vocabulary) contribute exactly 0 to the value and to the gradient. Half precision is upcast.

    Args:
        logits: ``[..., V]``, e.g. ``[B, T, V]``.
        chunk_size: process this many flattened positions at a time (caps the float32 temporaries at a
            few ``chunk_size × V`` tensors); ``None`` = all at once.
        temperature: the sampling temperature T > 0, applied after the upcast.

    Returns:
        ``[...]`` entropies in nats (e.g. ``[B, T]``); float32 for half-precision input. Not masked:
        reduce with :func:`masked_mean`.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    dtype = _compute_dtype(logits.dtype)
    outs = []
    for lg in _rows(flat, chunk_size):
        logp = torch.log_softmax(lg.to(dtype) / temperature, dim=-1)
        p = logp.exp()
        # where, not p * logp: 0 * -inf is NaN in both the value and the backward pass.
        safe_logp = torch.where(p > 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
        outs.append(-(p * safe_logp).sum(dim=-1))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out.reshape(logits.shape[:-1])


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """Critic quality: ``1 − Var[R − V] / Var[R]`` over real tokens.

    1 = perfect, 0 = no better than predicting the mean return, < 0 = worse. NaN when ``Var[R] = 0``
    (nothing to explain; the Stable-Baselines3 convention).

    Args:
        values: ``[B, T]`` critic predictions.
        returns: ``[B, T]`` GAE returns.
        mask: ``[B, T]`` response mask.

    Returns:
        0-dim detached tensor.
    """
    _check_same_shape(values=values, returns=returns, mask=mask)
    values = values.detach()
    returns = returns.detach()
    # Bessel's factor cancels in the ratio; biased variances avoid the n = 1 special case.
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    nan = torch.full_like(var_returns, float("nan"))
    return torch.where(var_returns > 0, 1.0 - var_residual / var_returns.clamp_min(1e-38), nan)


# --------------------------------------------------------------------------------------------------
# running reward statistics
# --------------------------------------------------------------------------------------------------


class RunningMoments:
    """Running mean / std of a stream of scores (Chan et al. parallel merge of Welford moments).

    Keeps ``count``, ``mean`` and the population variance in float64 Python floats, so it is cheap,
    device-agnostic and exactly checkpointable (:meth:`state_dict`). Used for optional running
    reward normalisation: ``scores = moments.normalize(scores)`` after ``moments.update(scores)``.
    """

    def __init__(self) -> None:
        self.count: float = 0.0
        self.mean: float = 0.0
        self.var: float = 0.0  # population (biased) variance of everything seen

    @property
    def std(self) -> float:
        """Unbiased standard deviation of everything seen (0 with fewer than 2 values)."""
        if self.count < 2:
            return 0.0
        return math.sqrt(self.var * self.count / (self.count - 1))

    def update(self, x: Tensor) -> tuple[float, float]:
        """Merge a batch ``x`` (any shape, all entries used) into the running moments.

        With the batch's ``n_b, μ_b, σ²_b`` (population) and ``δ = μ_b − μ``::

            n' = n + n_b
            μ' = μ + δ · n_b / n'
            σ²' = (n·σ² + n_b·σ²_b + δ² · n · n_b / n') / n'

        Returns:
            ``(batch_mean, batch_std)`` of this batch (unbiased std; 0 for a single value), for logging.
        """
        xd = x.detach().to(torch.float64).reshape(-1)
        n_b = float(xd.numel())
        if n_b == 0:
            return 0.0, 0.0
        mean_b = float(xd.mean())
        var_b = float(xd.var(correction=0))
        total = self.count + n_b
        delta = mean_b - self.mean
        m2 = self.var * self.count + var_b * n_b + delta * delta * self.count * n_b / total
        self.mean += delta * n_b / total
        self.var = m2 / total
        self.count = total
        batch_std = math.sqrt(var_b * n_b / (n_b - 1)) if n_b > 1 else 0.0
        return mean_b, batch_std

    def normalize(self, x: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
        """``(x − μ) / (σ + eps)``, or ``x / (σ + eps)`` with ``shift_mean=False``. Same shape as ``x``."""
        centered = x - self.mean if shift_mean else x
        return centered / (self.std + eps)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count = float(state["count"])
        self.mean = float(state["mean"])
        self.var = float(state["var"])
