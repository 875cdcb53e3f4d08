"""Unit tests for align.rl.functional: every expected value is worked out by hand in the test."""

from __future__ import annotations

import math

import pytest
import torch

from align.rl import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clip_scores,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    value_loss,
)

NAN = float("nan")


def close(actual: torch.Tensor | float, expected: object, atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=1e-5,
        equal_nan=True,
    )


# --------------------------------------------------------------------------------------------------
# masked statistics
# --------------------------------------------------------------------------------------------------

# Real entries: 1, 2 (row 0) and 4 (row 1). Padding holds NaN/inf to prove it is ignored.
X = torch.tensor([[1.0, 2.0, NAN], [4.0, float("inf"), -7.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_and_mean() -> None:
    close(masked_sum(X, M), 1 + 2 + 4)
    close(masked_mean(X, M), (1 + 2 + 4) / 3)
    close(masked_sum(X, M, dim=1), [1 + 2, 4])
    close(masked_mean(X, M, dim=1), [(1 + 2) / 2, 4 / 1])
    close(masked_mean(X, M, dim=1, keepdim=True), [[1.5], [4.0]])
    close(masked_mean(X, M.bool()), 7 / 3)  # bool masks work too


def test_masked_mean_of_empty_slice_is_zero_not_nan() -> None:
    mask = torch.tensor([[0, 0, 0], [1, 0, 0]])
    close(masked_mean(X, mask, dim=1), [0.0, 4.0])
    close(masked_mean(X, torch.zeros_like(mask)), 0.0)


def test_masked_var() -> None:
    # Real values 1, 2, 4: mean 7/3, deviations -4/3, -1/3, 5/3, squares 16/9 + 1/9 + 25/9 = 42/9.
    close(masked_var(X, M, unbiased=False), (42 / 9) / 3)  # 14/9
    close(masked_var(X, M, unbiased=True), (42 / 9) / 2)  # 7/3
    # Per row (dim=1): row 0 {1, 2}: mean 1.5, squares 0.25 + 0.25 -> biased 0.25, unbiased 0.5;
    # row 1 {4}: one value -> 0 biased, and 0 (not NaN) unbiased.
    close(masked_var(X, M, unbiased=False, dim=1), [0.25, 0.0])
    close(masked_var(X, M, unbiased=True, dim=1), [0.5, 0.0])


def test_masked_whiten() -> None:
    mean, var = 7 / 3, 7 / 3  # from test_masked_var (unbiased)
    std = math.sqrt(var + 1e-8)
    expected = [[(1 - mean) / std, (2 - mean) / std, 0.0], [(4 - mean) / std, 0.0, 0.0]]
    white = masked_whiten(X, M)
    close(white, expected)
    close(masked_mean(white, M), 0.0)
    close(masked_var(white, M), 1.0, atol=1e-5)

    kept = masked_whiten(X, M, shift_mean=False)
    close(kept, [[(1 - mean) / std + mean, (2 - mean) / std + mean, 0.0], [(4 - mean) / std + mean, 0, 0]])


def test_masked_whiten_constant_batch_is_zero() -> None:
    x = torch.full((2, 3), 5.0)
    close(masked_whiten(x, torch.ones(2, 3)), torch.zeros(2, 3))


# --------------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------------


def test_compute_gae_hand_computed_right_padding() -> None:
    # Padding positions hold junk rewards (5.0) and values (9.0): they must be ignored.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0], [0.5, 1.0, 5.0, 5.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.4, 0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    gamma, lam = 0.9, 0.5
    gl = gamma * lam  # 0.45
    # Row 0 (V after the last real token = 0):
    d2 = 1.0 + gamma * 0.0 - 0.3  # 0.7
    d1 = 0.0 + gamma * 0.3 - 0.2  # 0.07
    d0 = 0.0 + gamma * 0.2 - 0.1  # 0.08
    a2 = d2  # 0.7
    a1 = d1 + gl * a2  # 0.385
    a0 = d0 + gl * a1  # 0.25325
    # Row 1:
    e1 = 1.0 + 0.0 - 0.5  # 0.5
    e0 = 0.5 + gamma * 0.5 - 0.4  # 0.55
    b1 = e1
    b0 = e0 + gl * b1  # 0.775
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    close(adv, [[a0, a1, a2, 0.0], [b0, b1, 0.0, 0.0]])
    close(adv[0, :3], [0.25325, 0.385, 0.7])
    close(ret, [[a0 + 0.1, a1 + 0.2, a2 + 0.3, 0.0], [b0 + 0.4, b1 + 0.5, 0.0, 0.0]])


def test_compute_gae_lambda_one_is_monte_carlo() -> None:
    # γ = λ = 1: A_t = Σ_{k≥t} r_k − V_t and every return equals the total reward-to-go.
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.1, 0.2, 0.3]])
    adv, ret = compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(adv, [[1 - 0.1, 1 - 0.2, 1 - 0.3]])
    close(ret, [[1.0, 1.0, 1.0]])


def test_compute_gae_lambda_zero_is_td0() -> None:
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25]])
    adv, _ = compute_gae(rewards, values, torch.ones(1, 2), gamma=1.0, lam=0.0)
    close(adv, [[0.0 + 0.25 - 0.5, 1.0 + 0.0 - 0.25]])


def test_compute_gae_left_padding_and_inner_holes_are_skipped() -> None:
    gamma, lam = 0.9, 0.5
    # Left padding: same real steps as row 0 of the right-padded test, shifted right by one.
    rewards = torch.tensor([[5.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[9.0, 0.1, 0.2, 0.3]])
    adv, ret = compute_gae(rewards, values, torch.tensor([[0, 1, 1, 1]]), gamma, lam)
    close(adv, [[0.0, 0.25325, 0.385, 0.7]])
    close(ret, [[0.0, 0.35325, 0.585, 1.0]])

    # Inner hole at t=1: step 0 links straight to step 2, no extra discount for the gap.
    rewards = torch.tensor([[0.0, 7.0, 1.0]])
    values = torch.tensor([[0.1, 9.0, 0.3]])
    adv, ret = compute_gae(rewards, values, torch.tensor([[1, 0, 1]]), gamma, lam)
    a2 = 1.0 - 0.3  # 0.7
    a0 = (0.0 + gamma * 0.3 - 0.1) + gamma * lam * a2  # 0.17 + 0.315 = 0.485
    close(adv, [[a0, 0.0, a2]])
    close(ret, [[a0 + 0.1, 0.0, 1.0]])


def test_compute_gae_padding_invariance_random() -> None:
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(1, 5, generator=g), torch.randn(1, 5, generator=g)
    adv_ref, ret_ref = compute_gae(r, v, torch.ones(1, 5), 0.99, 0.95)
    # Scatter the same 5 steps into width 9 with holes and junk at masked positions.
    pos = torch.tensor([1, 2, 4, 7, 8])
    r9, v9 = torch.full((1, 9), NAN), torch.full((1, 9), NAN)
    r9[0, pos], v9[0, pos] = r[0], v[0]
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, pos] = True
    adv9, ret9 = compute_gae(r9, v9, mask, 0.99, 0.95)
    close(adv9[0, pos], adv_ref[0])
    close(ret9[0, pos], ret_ref[0])
    close(adv9[~mask], torch.zeros(4))
    close(ret9[~mask], torch.zeros(4))


def test_compute_gae_detaches_and_validates() -> None:
    values = torch.zeros(1, 2, requires_grad=True)
    adv, ret = compute_gae(torch.ones(1, 2), values, torch.ones(1, 2), 1.0, 1.0)
    assert not adv.requires_grad and not ret.requires_grad
    with pytest.raises(ValueError, match="shape mismatch"):
        compute_gae(torch.ones(1, 2), torch.ones(1, 3), torch.ones(1, 2), 1.0, 1.0)
    with pytest.raises(ValueError):
        compute_gae(torch.ones(1, 2), torch.ones(1, 2), torch.ones(1, 2), 1.5, 1.0)


# --------------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------------


def test_kl_estimators_hand_computed() -> None:
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    close(kl_k1(logp, ref), [-1.0 - -1.5, -2.0 - -1.0])  # [0.5, -1.0]
    close(kl_k2(logp, ref), [0.5 * 0.5**2, 0.5 * 1.0**2])  # [0.125, 0.5]
    # d = ref − logp = [-0.5, 1.0]; k3 = e^d − d − 1.
    close(kl_k3(logp, ref), [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1])  # [0.10653, 0.71828]
    close(kl_penalty(logp, ref, "abs"), [0.5, 1.0])
    for kind, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        close(kl_penalty(logp, ref, kind), fn(logp, ref))
    with pytest.raises(ValueError, match="unknown KL kind"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_k1_and_k3_are_unbiased_for_kl_under_policy_samples() -> None:
    p = torch.softmax(torch.tensor([0.5, -0.2, 1.0]), -1)
    q = torch.softmax(torch.tensor([0.0, 0.3, 0.1]), -1)
    true_kl = float((p * (p / q).log()).sum())
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref = p.log()[tokens], q.log()[tokens]
    close(kl_k1(logp, ref).mean(), true_kl, atol=5e-3)
    close(kl_k3(logp, ref).mean(), true_kl, atol=5e-3)
    assert (kl_k3(logp, ref) >= 0).all()


def test_per_token_rewards_hand_computed() -> None:
    # Row 0: right padding; row 1: left + right padding. NaN log-probs at padding must be ignored.
    logp = torch.tensor([[-1.0, -2.0, -0.5, NAN], [NAN, -0.2, -0.3, NAN]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [0.0, -0.4, -0.1, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = per_token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    close(kl, [[0.5, -1.0, 0.0, 0.0], [0.0, 0.2, -0.2, 0.0]])
    close(
        rewards,
        [
            [-0.1 * 0.5, -0.1 * -1.0, -0.1 * 0.0 + 2.0, 0.0],
            [0.0, -0.1 * 0.2, -0.1 * -0.2 + -1.0, 0.0],
        ],
    )


def test_per_token_rewards_k3_clip_and_empty_row() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    rewards, kl = per_token_rewards(
        torch.tensor([20.0, 3.0]), logp, ref, mask, kl_coef=torch.tensor(0.5), kl_kind="k3", score_clip=10.0
    )
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 2]
    close(kl, [k3, [0.0, 0.0]])
    # Score 20 clipped to 10 on the last real token; the empty row gets no score at all.
    close(rewards, [[-0.5 * k3[0], -0.5 * k3[1] + 10.0], [0.0, 0.0]])


def test_per_token_rewards_are_detached() -> None:
    logp = torch.zeros(1, 2, requires_grad=True)
    rewards, kl = per_token_rewards(torch.ones(1), logp, torch.zeros(1, 2), torch.ones(1, 2), 0.1)
    assert not rewards.requires_grad and not kl.requires_grad


def test_kl_controllers() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    # KL 9 vs target 6: error 9/6 − 1 = 0.5, clipped to 0.2; β *= 1 + 0.2·256/10000 = 1.00512.
    close(ctl.update(9.0, n_steps=256), 0.2 * 1.00512)  # 0.201024
    # KL 5.4: error 0.9 − 1 = −0.1 (inside the clip); β *= 1 − 0.1·0.0256 = 0.99744.
    close(ctl.update(torch.tensor(5.4), n_steps=256), 0.201024 * 0.99744)  # 0.2005094
    close(ctl.value, 0.201024 * 0.99744)
    # Far below target: error clipped at −0.2.
    before = ctl.value
    close(ctl.update(0.0, n_steps=10_000), before * 0.8)

    fixed = FixedKLController(0.05)
    close(fixed.update(100.0, 256), 0.05)
    close(fixed.value, 0.05)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=1.0)


# --------------------------------------------------------------------------------------------------
# policy loss
# --------------------------------------------------------------------------------------------------

# Ratios ρ and advantages for a 2 × 3 batch, last token of row 1 is padding.
RATIOS = torch.tensor([[1.5, 0.5, 1.1], [0.7, 1.0, 1.0]])
ADV = torch.tensor([[1.0, 1.0, -2.0], [-1.0, 3.0, 0.0]])
PMASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -0.7]])
# Per-token losses with ε = 0.2, ℓ = max(−Aρ, −A·clip(ρ, 0.8, 1.2)):
#   (0,0) ρ 1.5, A  1: max(−1.5, −1.2) = −1.2  clipped
#   (0,1) ρ 0.5, A  1: max(−0.5, −0.8) = −0.5
#   (0,2) ρ 1.1, A −2: max( 2.2,  2.2) =  2.2
#   (1,0) ρ 0.7, A −1: max( 0.7,  0.8) =  0.8  clipped
#   (1,1) ρ 1.0, A  3: max(−3.0, −3.0) = −3.0
LOSSES = [[-1.2, -0.5, 2.2], [0.8, -3.0, 0.0]]


def _logp(ratios: torch.Tensor = RATIOS, old: torch.Tensor = OLD) -> torch.Tensor:
    return (old + ratios.log()).requires_grad_(True)


def test_policy_loss_token_mean_stats_and_gradient() -> None:
    logp = _logp()
    loss, stats = policy_loss(logp, OLD, ADV, PMASK, clip_eps=0.2)
    close(loss, (-1.2 - 0.5 + 2.2 + 0.8 - 3.0) / 5)  # -0.34
    close(stats["clip_fraction"], 2 / 5)
    close(stats["dual_clip_fraction"], 0.0)
    close(stats["ratio_mean"], (1.5 + 0.5 + 1.1 + 0.7 + 1.0) / 5)  # 0.96
    close(stats["ratio_max"], 1.5)
    # approx_kl = mean over real tokens of ρ − 1 − log ρ.
    k3 = [r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 0.7, 1.0)]
    close(stats["approx_kl"], sum(k3) / 5)  # ≈ 0.069809

    # ∂ℓ/∂logp = −Aρ on the unclipped branch, 0 where the clip binds, 0 at padding; /5 for the mean.
    loss.backward()
    close(logp.grad, [[0.0, -1.0 * 0.5 / 5, 2.0 * 1.1 / 5], [0.0, -3.0 * 1.0 / 5, 0.0]])


def test_policy_loss_clip_higher() -> None:
    # ε_high = 0.6: ρ = 1.5 at A = 1 is no longer clipped, ℓ = −1.5 instead of −1.2. The low side
    # still clips ρ = 0.7 at A = −1 (0.8).
    logp = _logp()
    loss, stats = policy_loss(logp, OLD, ADV, PMASK, clip_eps=0.2, clip_eps_high=0.6)
    close(loss, (-1.5 - 0.5 + 2.2 + 0.8 - 3.0) / 5)  # -0.4
    close(stats["clip_fraction"], 1 / 5)
    loss.backward()
    assert logp.grad is not None and logp.grad[0, 0] != 0 and logp.grad[1, 0] == 0


def test_policy_loss_dual_clip() -> None:
    ratios = torch.tensor([[5.0, 2.0, 5.0]])
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    old = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    # Plain PPO: (ρ 5, A −1) → max(5, 0.8) = 5; (ρ 2, A −1) → 2; (ρ 5, A 1) → max(−5, −1.2) = −1.2.
    loss, stats = policy_loss(_logp(ratios, old), old, adv, mask)
    close(loss, (5.0 + 2.0 - 1.2) / 3)
    # Dual clip c = 3 caps the first at c·|A| = 3; 2 < 3 stays; A > 0 is untouched.
    logp = _logp(ratios, old)
    loss, stats = policy_loss(logp, old, adv, mask, dual_clip=3.0)
    close(loss, (3.0 + 2.0 - 1.2) / 3)
    close(stats["dual_clip_fraction"], 1 / 3)
    close(stats["clip_fraction"], 1 / 3)
    loss.backward()
    close(logp.grad, [[0.0, 1.0 * 2.0 / 3, 0.0]])  # only the unclipped token has gradient −Aρ/3
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, mask, dual_clip=1.0)


def test_policy_loss_padding_nan_does_not_leak() -> None:
    logp = _logp().detach().clone()
    old, adv = OLD.clone(), ADV.clone()
    logp[1, 2], old[1, 2], adv[1, 2] = NAN, float("inf"), NAN
    logp.requires_grad_(True)
    loss, stats = policy_loss(logp, old, adv, PMASK)
    close(loss, -0.34)
    assert all(torch.isfinite(v) for v in stats.values())
    loss.backward()
    assert logp.grad is not None and torch.isfinite(logp.grad).all()
    assert logp.grad[1, 2] == 0


def test_policy_loss_sequence_advantages_broadcast() -> None:
    adv_seq = torch.tensor([1.0, -1.0])
    loss_seq, _ = policy_loss(_logp(), OLD, adv_seq, PMASK)
    loss_tok, _ = policy_loss(_logp(), OLD, adv_seq[:, None].expand(2, 3), PMASK)
    close(loss_seq, loss_tok)


def test_policy_loss_no_gradient_into_targets() -> None:
    old = OLD.clone().requires_grad_(True)
    adv = ADV.clone().requires_grad_(True)
    loss, _ = policy_loss(_logp(), old, adv, PMASK)
    loss.backward()
    assert old.grad is None and adv.grad is None


# --------------------------------------------------------------------------------------------------
# value loss
# --------------------------------------------------------------------------------------------------

V = torch.tensor([[1.0, 0.5, 2.0], [0.0, 0.3, 9.0]])
V_OLD = torch.tensor([[0.5, 0.5, 1.0], [0.3, 0.0, NAN]])
RET = torch.tensor([[1.2, 0.0, 1.1], [0.1, 0.5, NAN]])
VMASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# ε = 0.2, v_clip = old + clip(v − old, ±0.2):
#   (0,0) v 1.0 old 0.5 → v_clip 0.7, R 1.2: (−0.2)² = 0.04 vs (−0.5)² = 0.25 → 0.25 clipped
#   (0,1) v 0.5 old 0.5 → 0.5,        R 0.0: 0.25 vs 0.25                      → 0.25
#   (0,2) v 2.0 old 1.0 → 1.2,        R 1.1: 0.81 vs 0.01                      → 0.81
#   (1,0) v 0.0 old 0.3 → 0.1,        R 0.1: 0.01 vs 0.00                      → 0.01
#   (1,1) v 0.3 old 0.0 → 0.2,        R 0.5: 0.04 vs 0.09                      → 0.09 clipped


def test_value_loss_clipped_hand_computed_with_gradient() -> None:
    values = V.clone().requires_grad_(True)
    loss, stats = value_loss(values, V_OLD, RET, VMASK, clip_range=0.2)
    close(loss, 0.5 * (0.25 + 0.25 + 0.81 + 0.01 + 0.09) / 5)  # 0.141
    close(stats["clip_fraction"], 2 / 5)
    close(stats["value_mean"], (1.0 + 0.5 + 2.0 + 0.0 + 0.3) / 5)
    close(stats["value_error"], (0.04 + 0.25 + 0.81 + 0.01 + 0.04) / 5)
    loss.backward()
    # ∂/∂v of ½(v − R)²/5 = (v − R)/5 on the unclipped branch; 0 where the clipped term wins.
    close(values.grad, [[0.0, 0.5 / 5, 0.9 / 5], [-0.1 / 5, 0.0, 0.0]])


def test_value_loss_unclipped() -> None:
    loss, stats = value_loss(V, V_OLD, RET, VMASK, clip_range=None)
    close(loss, 0.5 * (0.04 + 0.25 + 0.81 + 0.01 + 0.04) / 5)  # 0.115
    close(stats["clip_fraction"], 0.0)


# --------------------------------------------------------------------------------------------------
# logits helpers
# --------------------------------------------------------------------------------------------------


def test_entropy_from_logits_hand_computed() -> None:
    # [0, ln 3] → p = [1/4, 3/4]; H = ¼ ln 4 + ¾ ln(4/3) ≈ 0.562335.
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [1000.0, 1000.0]]])
    h = entropy_from_logits(logits)
    assert h.shape == (1, 3)
    close(h, [[math.log(2), 0.25 * math.log(4) + 0.75 * math.log(4 / 3), math.log(2)]])


def test_entropy_masked_vocab_and_half_precision() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, float("-inf")]], requires_grad=True)
    h = entropy_from_logits(logits)
    close(h, [math.log(3)])
    h.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    close(logits.grad, torch.zeros(1, 4))  # entropy is maximal (uniform over the allowed 3)

    bf = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(1))
    out = entropy_from_logits(bf.bfloat16())
    assert out.dtype == torch.float32
    close(out, entropy_from_logits(bf.bfloat16().float()))
    close(entropy_from_logits(bf, chunk_size=4), entropy_from_logits(bf))


def test_logprobs_from_logits() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)], [500.0, 0.0]]])
    labels = torch.tensor([[1, 0, 0]])
    # p = [1/4, 3/4] → ln ¾ and ln ¼; [500, 0] → label 0 has log-prob −log(1 + e^−500) ≈ 0.
    close(logprobs_from_logits(logits, labels), [[math.log(0.75), math.log(0.25), 0.0]])

    g = torch.Generator().manual_seed(0)
    big = torch.randn(2, 5, 13, generator=g)
    lab = torch.randint(0, 13, (2, 5), generator=g)
    expected = torch.log_softmax(big, -1).gather(-1, lab[..., None]).squeeze(-1)
    close(logprobs_from_logits(big, lab), expected)
    close(logprobs_from_logits(big, lab, chunk_size=3), expected)
    out = logprobs_from_logits(big.bfloat16(), lab)
    assert out.dtype == torch.float32

    lab_ignored = lab.clone()
    lab_ignored[1, 3:] = -100
    out = logprobs_from_logits(big, lab_ignored)
    close(out[1, 3:], [0.0, 0.0])
    close(out[0], expected[0])


def test_logprobs_from_logits_gradient_matches_log_softmax() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 7, generator=g, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    lab = torch.randint(0, 7, (2, 3), generator=g)
    logprobs_from_logits(a, lab, chunk_size=2).sum().backward()
    torch.log_softmax(b, -1).gather(-1, lab[..., None]).sum().backward()
    close(a.grad, b.grad)


def test_explained_variance() -> None:
    returns = torch.tensor([[1.0, 2.0, 3.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    close(explained_variance(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), returns, mask), 1.0)
    close(explained_variance(torch.full((1, 4), 2.0), returns, mask), 0.0)  # residual = R − mean R
    # V = [1, 2, 4]: residual [0, 0, −1], mean −1/3, var (1/9 + 1/9 + 4/9)/3 = 2/9; Var R = 2/3.
    close(explained_variance(torch.tensor([[1.0, 2.0, 4.0, 0.0]]), returns, mask), 1 - (2 / 9) / (2 / 3))
    assert torch.isnan(explained_variance(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2)))


# --------------------------------------------------------------------------------------------------
# score clipping, running moments
# --------------------------------------------------------------------------------------------------


def test_clip_scores() -> None:
    scores = torch.tensor([-20.0, 3.0, 15.0])
    close(clip_scores(scores, 10.0), [-10.0, 3.0, 10.0])
    assert clip_scores(scores, None) is scores


def test_running_moments_parallel_merge() -> None:
    rm = RunningMoments()
    close(rm.update(torch.tensor([1.0, 2.0, 3.0])), (2.0, 1.0))
    # Merge [4, 5]: n_b 2, μ_b 4.5, σ²_b 0.25, δ 2.5, n' 5:
    #   μ' = 2 + 2.5·2/5 = 3;  σ²' = (3·⅔ + 2·0.25 + 2.5²·3·2/5) / 5 = (2 + 0.5 + 7.5)/5 = 2.
    close(rm.update(torch.tensor([[4.0], [5.0]])), (4.5, math.sqrt(0.5)))
    close([rm.count, rm.mean, rm.var], [5.0, 3.0, 2.0])  # = moments of 1..5
    close(rm.std, math.sqrt(2.0 * 5 / 4))
    close(rm.normalize(torch.tensor([3.0, 5.0])), [0.0, 2 / (math.sqrt(2.5) + 1e-8)])
    close(rm.normalize(torch.tensor([5.0]), shift_mean=False), [5 / (math.sqrt(2.5) + 1e-8)])

    other = RunningMoments()
    other.load_state_dict(rm.state_dict())
    assert other.state_dict() == rm.state_dict()
    assert RunningMoments().std == 0.0
