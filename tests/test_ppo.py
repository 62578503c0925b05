"""PPO math (trainer/ppo_math.py) against hand-computed numbers and reference implementations.

Each expected number below is worked out by hand in the comment next to it. The last tests use
the tiny real model of conftest (no vLLM): the policy's log-probs agree with the plain HF model
on a left-padded batch, and one clipped PPO step changes exactly the trained parameters.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainer.policy import (collate, freeze_lower_layers, kl_to_reference, load_policy, sequence_logprobs,
                            shared_trunk_depth)
from trainer.ppo_math import (
    AdaptiveKLController,
    LengthFit,
    dpo_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_per_token,
    kl_spent,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    raft_loss,
    rloo_advantages,
    shaped_rewards,
    value_loss,
)


def test_masked_mean_and_whitening_ignore_padding() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    # mean 2, unbiased variance ((-1)² + 0 + 1²) / 2 = 1 -> (x - 2) / 1 on the real entries
    w = masked_whiten(x, mask)
    assert torch.allclose(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4)
    # shift_mean=False keeps the mean: whitened + 2
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False)[0, :3], torch.tensor([1.0, 2.0, 3.0]), atol=1e-4)


def test_gae_matches_hand_computed_values() -> None:
    values = torch.tensor([[1.0, 2.0, 0.5], [3.0, 1.0, 9.0]])
    rewards = torch.tensor([[0.0, 1.0, 2.0], [1.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(values, rewards, mask, gamma=0.9, lam=0.5)
    # row 0: δ2 = 2 + 0 - 0.5 = 1.5, A2 = 1.5
    #        δ1 = 1 + 0.9·0.5 - 2 = -0.55, A1 = -0.55 + 0.45·1.5 = 0.125
    #        δ0 = 0 + 0.9·2 - 1 = 0.8,   A0 = 0.8 + 0.45·0.125 = 0.85625
    # row 1 (last token is padding, its V and r count as 0):
    #        A2 = 0; δ1 = 2 + 0 - 1 = 1, A1 = 1; δ0 = 1 + 0.9·1 - 3 = -1.1, A0 = -1.1 + 0.45·1 = -0.65
    expected = torch.tensor([[0.85625, 0.125, 1.5], [-0.65, 1.0, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, expected + values * mask, atol=1e-6)
    # oracle: γ = λ = 1 and V = 0 make A_t the sum of the rewards from t on
    r = torch.randn(4, 6)
    a, _ = gae(torch.zeros(4, 6), r, torch.ones(4, 6), gamma=1.0, lam=1.0)
    assert torch.allclose(a, r.flip(1).cumsum(1).flip(1), atol=1e-5)
    # λ = 0 is the one-step TD error
    v = torch.randn(4, 6)
    a, _ = gae(v, r, torch.ones(4, 6), gamma=0.99, lam=0.0)
    nxt = torch.cat([v[:, 1:], torch.zeros(4, 1)], 1)
    assert torch.allclose(a, r + 0.99 * nxt - v, atol=1e-5)


def test_shaped_rewards_put_the_score_on_the_last_token() -> None:
    scores = torch.tensor([2.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards, kl = shaped_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # k1 = logp - ref = [0.5, 0, -1, (pad) 0]; r = -0.1·k1, + 2 on the last real token
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 2.1, 0.0]]))


def test_clipped_policy_loss_matches_hand_computed_values() -> None:
    ratio = torch.tensor([[1.5, 0.5, 1.1]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = policy_loss(ratio.log(), old, adv, torch.ones(1, 3), cliprange=0.2)
    # -A·r = [-1.5, -0.5, 1.1]; -A·clip(r, 0.8, 1.2) = [-1.2, -0.8, 1.1]; max = [-1.2, -0.5, 1.1]
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3, abs=1e-6)  # -0.2
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)  # only the first token's clip was active
    # approx KL (k3) of old vs new: mean of (r - 1) - log r
    k3 = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)) / 3
    assert stats["approx_kl"].item() == pytest.approx(k3, rel=1e-5)
    # the gradient flows only where the unclipped term is the max: tokens 2 and 3
    lp = ratio.log().clone().requires_grad_(True)
    policy_loss(lp, old, adv, torch.ones(1, 3), cliprange=0.2)[0].backward()
    assert lp.grad is not None
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] == pytest.approx(-0.5 / 3) and lp.grad[0, 2] == pytest.approx(1.1 / 3)


def test_clipped_value_loss_matches_hand_computed_values() -> None:
    values = torch.tensor([[1.5, 0.0]])
    old = torch.tensor([[1.0, 1.0]])
    returns = torch.tensor([[2.0, 0.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # V_clip = [1.2, 0.8]; (V - R)² = [0.25, 0]; (V_clip - R)² = [0.64, 0.64]; ½·mean(max) = 0.32
    assert loss.item() == pytest.approx(0.32, abs=1e-6)
    assert stats["vf_clipfrac"].item() == 1.0
    # inside the clip range it is the plain ½ MSE
    loss, _ = value_loss(torch.tensor([[1.1]]), torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.5 * 0.81, abs=1e-6)


def test_kl_estimators_and_logprob_helpers_match_references() -> None:
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(8), torch.randn(8)
    p, q = torch.distributions.Categorical(logits=p_logits), torch.distributions.Categorical(logits=q_logits)
    x = p.sample((200_000,))
    exact = torch.distributions.kl_divergence(p, q).item()
    k1 = kl_per_token(p.log_prob(x), q.log_prob(x), "k1")
    k3 = kl_per_token(p.log_prob(x), q.log_prob(x), "k3")
    assert k1.mean().item() == pytest.approx(exact, abs=0.02)
    assert k3.mean().item() == pytest.approx(exact, abs=0.02) and (k3 >= -1e-6).all()
    logits = torch.randn(2, 3, 11)
    labels = torch.randint(0, 11, (2, 3))
    dist = torch.distributions.Categorical(logits=logits)
    assert torch.allclose(logprobs_from_logits(logits, labels), dist.log_prob(labels), atol=1e-5)
    assert torch.allclose(entropy_from_logits(logits), dist.entropy(), atol=1e-5)
    assert explained_variance(torch.ones(1, 4), torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.ones(1, 4)) == \
        pytest.approx(0.0, abs=1e-6)


def test_rloo_advantages_use_the_siblings_as_baseline() -> None:
    # two prompts (groups 5 and 9) with two answers each: A_i = R_i - R_sibling
    rewards = torch.tensor([1.0, 3.0, 2.0, 6.0])
    assert rloo_advantages(rewards, torch.tensor([5, 5, 9, 9])).tolist() == [-2.0, 2.0, -4.0, 4.0]
    # three answers to one prompt: A_0 = 1 - (2 + 6)/2 = -3, A_1 = 2 - (1 + 6)/2 = -1.5, A_2 = 6 - 1.5 = 4.5
    three = rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), torch.tensor([0, 0, 0]))
    assert torch.allclose(three, torch.tensor([-3.0, -1.5, 4.5]))
    with pytest.raises(ValueError, match="at least two"):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


def test_rloo_loss_matches_a_hand_computed_value() -> None:
    """The RLOO update's loss on a toy batch: 2 prompts x 2 answers, sequence rewards R = [1, 3, 2, 6]
    (score - β·KL already applied), each token carries its answer's leave-one-out advantage,
    the clipped surrogate (ε = 0.2) averaged over the 6 answer tokens."""
    rewards, groups = torch.tensor([1.0, 3.0, 2.0, 6.0]), torch.tensor([0, 0, 1, 1])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    advantages = rloo_advantages(rewards, groups)[:, None] * mask  # A = [-2, 2, -4, 4]
    ratios = torch.tensor([[1.0, 1.5], [0.5, 1.0], [1.1, 1.0], [0.9, 1.0]])
    old = torch.full((4, 2), -2.0)
    loss, _ = policy_loss(old + ratios.log(), old, advantages, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   answer 0 (A=-2): r=1.0 -> 2;   r=1.5 -> max(3, 2.4) = 3
    #   answer 1 (A=+2): r=0.5 -> max(-1, -1.6) = -1
    #   answer 2 (A=-4): r=1.1 -> 4.4
    #   answer 3 (A=+4): r=0.9 -> -3.6; r=1.0 -> -4
    # sum 0.8 over 6 tokens
    assert loss.item() == pytest.approx(0.8 / 6, abs=1e-6)


def test_raft_loss_matches_a_hand_computed_value() -> None:
    """RAFT on a toy batch of two best answers: summed log-probs -6 over 3 tokens and -2 over 4."""
    logps, tokens = torch.tensor([-6.0, -2.0]), torch.tensor([3.0, 4.0])
    loss, stats = raft_loss(logps, tokens)
    # per token: 6 / 3 = 2.0 and 2 / 4 = 0.5, averaged over the two answers: 1.25
    assert loss.item() == pytest.approx(1.25) and stats["nll"].item() == pytest.approx(1.25)
    # one rank's share of a minibatch of 4 answers: the same sum over 4
    assert raft_loss(logps, tokens, count=4)[0].item() == pytest.approx(2.5 / 4)
    # the gradient raises each answer's log-prob, by 1 / (its tokens x answers)
    lp = logps.clone().requires_grad_(True)
    raft_loss(lp, tokens)[0].backward()
    assert torch.allclose(lp.grad, torch.tensor([-1 / 6, -1 / 8]))  # type: ignore[arg-type]


def test_dpo_loss_matches_a_hand_computed_value() -> None:
    """DPO on a toy batch of two pairs, β = 0.5: summed answer log-probs under the policy and the
    reference."""
    chosen, rejected = torch.tensor([-4.0, -10.0]), torch.tensor([-6.0, -7.0])
    ref_chosen, ref_rejected = torch.tensor([-5.0, -9.0]), torch.tensor([-5.0, -8.0])
    loss, stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    # pair 0: 0.5 * ((-4 + 5) - (-6 + 5)) = 0.5 * (1 + 1) = 1.0  -> -log σ(1) = 0.31326
    # pair 1: 0.5 * ((-10 + 9) - (-7 + 8)) = 0.5 * (-1 - 1) = -1.0 -> -log σ(-1) = 1.31326
    assert loss.item() == pytest.approx((0.313262 + 1.313262) / 2, abs=1e-5)
    assert stats["accuracy"].item() == 0.5 and stats["margin"].item() == pytest.approx(0.0)
    # one rank's share of a minibatch of 4 pairs: the same sum over 4, not over its own 2
    share, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, pair_count=4)
    assert share.item() == pytest.approx(loss.item() / 2, abs=1e-6)
    # the gradient raises the chosen answer's log-prob and lowers the rejected one's
    c = chosen.clone().requires_grad_(True)
    r = rejected.clone().requires_grad_(True)
    dpo_loss(c, r, ref_chosen, ref_rejected, beta=0.5)[0].backward()
    assert bool((c.grad < 0).all()) and bool((r.grad > 0).all())
    # RPO: + α x the chosen answers' NLL per token, -(-4) / 2 = 2 and -(-10) / 5 = 2, averaged: 2
    tokens = torch.tensor([2.0, 5.0])
    rpo, rpo_stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, nll_coef=0.25,
                              chosen_tokens=tokens)
    assert rpo.item() == pytest.approx(loss.item() + 0.25 * 2.0, abs=1e-5)
    assert rpo_stats["nll"].item() == pytest.approx(2.0)
    # its gradient on a chosen log-prob adds -α / (tokens x pairs): -0.25 / (2 x 2) on pair 0
    c2 = chosen.clone().requires_grad_(True)
    dpo_loss(c2, rejected, ref_chosen, ref_rejected, beta=0.5, nll_coef=0.25, chosen_tokens=tokens)[0].backward()
    assert c2.grad is not None and c.grad is not None
    assert (c2.grad - c.grad).tolist() == pytest.approx([-0.25 / 4, -0.25 / 10])
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, nll_coef=0.25)


def test_adaptive_kl_controller_moves_beta_toward_the_target() -> None:
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    # KL 2 > target 1: error clipped to +0.2, β·(1 + 0.2·10/100) = 0.102
    assert ctl.update(2.0, 10) == pytest.approx(0.102)
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(0.5, 10) == pytest.approx(0.098)  # error -0.5 clipped to -0.2
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert ctl.update(1.1, 10) == pytest.approx(0.1 * 1.01)  # error 0.1, inside the clip
    fixed = AdaptiveKLController(0.1, target=1.0, horizon=100, fixed=True)
    assert fixed.update(5.0, 10) == 0.1


def test_the_kl_budget_is_spent_when_the_windows_mean_passes_it() -> None:
    kls = [0.25, 0.5, 1.25, 2.0]  # the last three's mean: 1.25, exactly
    assert not kl_spent(kls, None, 1)  # no budget: never
    assert not kl_spent(kls[:2], 0.01, 3)  # fewer iterations than the window: not yet
    assert kl_spent(kls, 1.2, 3)
    assert not kl_spent(kls, 1.25, 3)  # the mean must pass the budget, not reach it
    assert kl_spent(kls, 1.8, 1) and not kl_spent(kls, 1.8, 2)  # one noisy iteration vs two (1.625)


def test_the_length_fit_takes_the_slope_of_ended_answers_out() -> None:
    fit = LengthFit(min_answers=3)
    lengths = torch.tensor([10.0, 20.0, 30.0, 64.0])
    scores = torch.tensor([3.0, 2.0, 1.0, -5.0])
    ended = torch.tensor([1.0, 1.0, 1.0, 0.0])
    fit.add(lengths[:2], scores[:2], ended[:2])
    assert fit.slope == 0.0  # 2 ended answers < min_answers: no fit yet
    fit.add(lengths[2:], scores[2:], ended[2:])
    # the ended rows (10, 3), (20, 2), (30, 1): slope -0.1 per token about mean length 20; the
    # cut-off row (64, -5) is not in the fit (with it the slope would be about -0.15)
    assert fit.slope == pytest.approx(-0.1) and fit.mean_length == pytest.approx(20.0)
    # share 1: 3 - (-0.1)(10 - 20) = 2, 2, 1 - (-0.1)(30 - 20) = 2; the cut-off one -5 + 0.1 (64 - 20)
    assert fit.neutral(scores, lengths, 1.0).tolist() == pytest.approx([2.0, 2.0, 2.0, -5.0 + 0.1 * 44])
    assert fit.neutral(scores, lengths, 0.5).tolist() == pytest.approx([2.5, 2.0, 1.5, -5.0 + 0.05 * 44])
    assert fit.neutral(scores, lengths, 0.0).tolist() == pytest.approx(scores.tolist())
    flat = LengthFit(min_answers=1)
    flat.add(torch.tensor([7.0, 7.0]), torch.tensor([1.0, 2.0]), torch.ones(2))
    assert flat.slope == 0.0  # no spread in length: nothing to fit


def test_a_length_neutral_run_scores_without_the_reward_models_length_slope(tiny_model: Path) -> None:
    from tests.dist_worker import fixed_rollout
    from trainer.policy import RewardScorer
    from trainer.ppo import PPOTrainer
    from trainer.ppo_config import PPOConfig
    from trainer.reward_model import load_reward_model

    torch.set_num_threads(1)
    rm, rm_tok = load_reward_model(tiny_model, seed=1)
    scored = {}
    for share in (0.0, 1.0):
        config = PPOConfig(batch_size=16, response_length=8, train_layers=1, threads=1, dtype="float32",
                           length_neutral=share)
        policy, tok, _ = load_policy(tiny_model)
        reference, _, _ = load_policy(tiny_model)
        trainer = PPOTrainer(config, policy, reference, tok, None, RewardScorer(rm, rm_tok, max_length=64),
                             None)
        trainer.length_fit = LengthFit(min_answers=2)
        scored[share] = trainer.score(*fixed_rollout(tok, config))
    plain, neutral = scored[0.0], scored[1.0]
    assert torch.equal(plain.scores, neutral.scores)  # the reward model's own scores are kept
    lengths = plain.batch.response_mask.sum(-1).double()
    ended = plain.ended > 0
    assert 2 <= int(ended.sum()) < 16
    x, y = lengths[ended], plain.scores[ended].double()
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    assert abs(slope) > 1e-4  # the untrained head does depend on length: the test has something to remove
    expected = plain.penalised.double() - slope * (lengths - x.mean())
    assert neutral.penalised.double().tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    # what is left among the ended answers no longer moves with their length
    residual = neutral.penalised.double()[ended]
    assert float(((x - x.mean()) * (residual - residual.mean())).sum()) == pytest.approx(0.0, abs=1e-4)


def test_policy_logprobs_match_the_hf_model_on_a_left_padded_batch(tiny_model: Path) -> None:
    torch.set_num_threads(1)
    policy, tok, saved = load_policy(tiny_model)
    assert saved == torch.bfloat16  # the tiny model is saved in bf16; training runs in float32
    prompts, answers = [[5, 6, 7, 8, 9], [11, 12]], [[20, 21, 22], [30]]
    batch = collate(prompts, answers, pad_id=tok.pad_token_id)
    assert batch.input_ids.shape == (2, 8) and batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    lp, values = sequence_logprobs(policy, batch, temperature=1.0)
    assert values is not None and torch.all(values == 0)  # the value head starts at zero
    for i in range(2):  # each row alone, no padding, through the plain HF forward
        ids = torch.tensor([prompts[i] + answers[i]])
        with torch.no_grad():
            logits = policy.lm(input_ids=ids).logits[0, len(prompts[i]) - 1: -1]
        alone = logprobs_from_logits(logits[None], torch.tensor([answers[i]]))[0]
        assert torch.allclose(lp[i, : len(answers[i])], alone, atol=1e-4)


def test_one_clipped_step_changes_exactly_the_trained_parameters(tiny_model: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    policy, tok, _ = load_policy(tiny_model)
    trained = freeze_lower_layers(policy, train_layers=1)  # top layer, norm, value head (the head is tied)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    batch = collate([[5, 6, 7], [8, 9]], [[20, 21], [30, 31]], pad_id=tok.pad_token_id)
    old_lp, old_v = sequence_logprobs(policy, batch, 1.0)
    assert old_v is not None
    adv, ret = gae(old_v, torch.tensor([[0.0, 1.0], [0.0, -1.0]]), batch.response_mask, 1.0, 0.95)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    logits, values = policy(batch.input_ids, batch.attention_mask, batch.start)
    assert values is not None
    pg, _ = policy_loss(logprobs_from_logits(logits, batch.input_ids[:, batch.start:]), old_lp,
                        masked_whiten(adv, batch.response_mask), batch.response_mask, 0.2)
    vf, _ = value_loss(values, old_v, ret, batch.response_mask, 0.2)
    (pg + 0.1 * vf).backward()
    opt.step()
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    grads = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert changed == grads and sum(before[n].numel() for n in grads) == trained
    assert not any(n.startswith("lm.model.layers.0.") for n in changed)  # frozen lower layer untouched
    # the tied LM head is the input embedding: training it would move every frozen layer's input
    assert "lm.model.embed_tokens.weight" not in changed and "lm.model.layers.1.mlp.up_proj.weight" in changed
    # the answer with the positive advantage became more likely
    new_lp, _ = sequence_logprobs(policy, batch, 1.0)
    assert new_lp[0, 1] > old_lp[0, 1] and new_lp[1, 1] < old_lp[1, 1]


def test_the_shared_trunk_gives_the_whole_models_numbers_and_only_when_it_is_shared(tiny_model: Path) -> None:
    """Policy and reference share their frozen lower layers: run once, the layers above give the same
    log-probs and values as the whole model, before and after a training step."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    policy, tok, _ = load_policy(tiny_model)
    reference, _, _ = load_policy(tiny_model)
    for p in reference.parameters():
        p.requires_grad_(False)
    assert shared_trunk_depth(policy, reference) == 0  # nothing frozen yet: nothing shared
    freeze_lower_layers(policy, train_layers=1)
    depth = shared_trunk_depth(policy, reference)
    assert depth == 1  # 2 layers, the top one trained
    batch = collate([[5, 6, 7, 8], [9, 10]], [[20, 21, 22], [30]], pad_id=tok.pad_token_id)
    trunk = policy.trunk(batch.input_ids, batch.attention_mask, depth)
    assert trunk.shape == (*batch.input_ids.shape, policy.lm.config.hidden_size)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        for model in (policy, reference):
            whole, v_whole = sequence_logprobs(model, batch, 0.7)
            split, v_split = sequence_logprobs(model, batch, 0.7, trunk=trunk, depth=depth)
            assert torch.allclose(whole, split, atol=1e-5) and v_whole is not None and v_split is not None
            assert torch.allclose(v_whole, v_split, atol=1e-5)
        if step == 0:  # a step on the top layer: the trunk (and the reference) stay valid
            logits, _ = policy(batch.input_ids, batch.attention_mask, batch.start, trunk=trunk, depth=depth)
            (-logprobs_from_logits(logits, batch.input_ids[:, batch.start:]).sum()).backward()
            opt.step()
    assert not torch.equal(sequence_logprobs(policy, batch, 0.7)[0], sequence_logprobs(reference, batch, 0.7)[0])
    assert torch.equal(policy.trunk(batch.input_ids, batch.attention_mask, depth), trunk)
    # a reference whose lower layer differs cannot share it
    with torch.no_grad():
        reference.lm.model.layers[0].mlp.up_proj.weight.add_(1e-3)
    assert shared_trunk_depth(policy, reference) == 0


def test_batched_kl_to_v0_matches_one_answer_at_a_time(tiny_model: Path, tmp_path: Path) -> None:
    """The loop's KL(version ‖ v0): batched, left-padded forward passes give the per-answer sums."""
    from simulation.evaluate import kl_to_base
    from trainer.policy import save_policy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    other, tok, dtype = load_policy(tiny_model)
    with torch.no_grad():
        for p in other.lm.model.layers[-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_policy(other, tok, tmp_path / "v1", dtype)

    class S:  # the engine's sample shape: prompt index and token ids
        def __init__(self, prompt: int, token_ids: list[int]) -> None:
            self.prompt, self.token_ids = prompt, token_ids

    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    samples = [S(0, [20, 21, 22]), S(1, [30]), S(1, [31, 32, 33, 34, 35]), S(0, [])]
    v1, _, _ = load_policy(tmp_path / "v1")
    v0, _, _ = load_policy(tiny_model)

    def by_hand(temperature: float) -> list[float]:
        """Per answer, one at a time, each model's logits divided by the sampling temperature."""
        sums = []
        for s in samples:
            if not s.token_ids:
                sums.append(0.0)
                continue
            ids, y = torch.tensor([prompts[s.prompt] + s.token_ids]), torch.tensor([s.token_ids])
            n = len(prompts[s.prompt])
            with torch.no_grad():
                a = logprobs_from_logits(v1.lm(input_ids=ids).logits[:, n - 1: -1] / temperature, y)
                b = logprobs_from_logits(v0.lm(input_ids=ids).logits[:, n - 1: -1] / temperature, y)
            sums.append(float((a - b).sum()))
        return sums

    def mean(xs: list[float]) -> float:
        return round(sum(xs) / len(xs), 4)

    # read at the temperature the evaluation sampled at (0.7), not at 1.0: the two differ
    for temperature in (1.0, 0.7):
        got = kl_to_base(tmp_path / "v1", tiny_model, prompts, samples, temperature)
        assert got != 0 and got == pytest.approx(mean(by_hand(temperature)), abs=2e-4), temperature
    assert abs(mean(by_hand(0.7)) - mean(by_hand(1.0))) > 1e-3
    assert kl_to_base(tiny_model, tiny_model, prompts, samples, 0.7) == 0
    # batched in order of length (3, 1, 5 and 0 tokens: each batch of 2 mixes the callers' order),
    # each answer's KL comes back in its own place
    each = kl_to_reference(v1, v0, tok, [prompts[s.prompt] for s in samples], [s.token_ids for s in samples],
                           1.0, batch_size=2)
    assert each == pytest.approx(by_hand(1.0), abs=1e-4)
    # only the top layer differs: the layers below ran once for both models (the whole-model
    # forward passes above are what that shortcut must reproduce)
    assert shared_trunk_depth(v1, v0, frozen=False) == len(v0.lm.model.layers) - 1
    assert shared_trunk_depth(v1, v0) == 0  # nothing in a loaded model is frozen: PPO's own test


def test_the_reward_scorer_runs_in_the_reward_models_dtype(tiny_model: Path, tmp_path: Path) -> None:
    """#18: PPO and the gate score under `reward_dtype` resolved for this hardware (the dtype the
    reward model trained in and its `reward_norm` was measured in), no longer a hard-coded float32;
    the score head's output dtype shows what really ran."""
    from kaizen.core.hardware import choose_dtype
    from trainer.policy import RewardScorer
    from trainer.reward_model import load_reward_model, save_model

    rm, tok = load_reward_model(tiny_model)
    folder = save_model(rm, tok, tmp_path / "rm", {"reward_norm": {"mean": 0.5, "std": 2.0}})
    prompts = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "name a colour"}]]
    answers = ["hi there", "blue, or perhaps green"]
    ran: list[torch.dtype] = []
    scores = {}
    for dtype in ("float32", "bfloat16"):
        scorer = RewardScorer.load(folder, 64, dtype)
        hook = scorer.model.score.register_forward_hook(lambda _m, _i, out: ran.append(out.dtype))
        scores[dtype] = scorer(prompts, answers)
        hook.remove()
    assert ran == [torch.float32, torch.bfloat16]
    # the same model and normalisation: only bf16's rounding separates the two
    f32, bf16 = scores["float32"], scores["bfloat16"]
    assert f32.dtype == bf16.dtype == torch.float32 and not torch.equal(f32, bf16)
    assert (f32 - bf16).abs().max() <= 0.1 * f32.abs().max() + 1e-2, (f32, bf16)
    assert RewardScorer.load(folder, 64, "auto").dtype == choose_dtype("auto").dtype


def test_ppo_passes_run_in_ppo_dtype_and_keep_float32_numbers(tiny_model: Path) -> None:
    """#18: `ppo_dtype` is the autocast of every policy and reference pass (scoring and the update,
    read from a trained layer's output); log-probs, values and the weights stay float32, and bf16
    gives float32's log-probs up to its rounding. auto is this machine's choice (kaizen/core/hardware.py)."""
    from kaizen.core.hardware import choose_dtype
    from tests.dist_worker import fixed_rollout
    from trainer.policy import RewardScorer
    from trainer.ppo import PPOTrainer
    from trainer.ppo_config import PPOConfig
    from trainer.reward_model import load_reward_model

    torch.set_num_threads(1)
    rm, rm_tok = load_reward_model(tiny_model, seed=1)
    old: dict[str, torch.Tensor] = {}
    for dtype in ("float32", "bfloat16"):
        config = PPOConfig(batch_size=8, response_length=8, lr=1e-3, train_layers=1, threads=1, dtype=dtype)
        policy, tok, _ = load_policy(tiny_model)
        reference, _, _ = load_policy(tiny_model)
        trainer = PPOTrainer(config, policy, reference, tok, None, RewardScorer(rm, rm_tok, max_length=64),
                             None)
        assert trainer.compute_dtype == getattr(torch, dtype)
        ran: list[torch.dtype] = []
        hooks = [model.lm.model.layers[-1].mlp.down_proj.register_forward_hook(
            lambda _m, _i, out: ran.append(out.dtype)) for model in (policy, reference)]
        before = policy.lm.model.layers[-1].mlp.down_proj.weight.detach().clone()
        scored = trainer.score(*fixed_rollout(tok, config))
        stats = trainer.update(scored, trainer.advantages(scored))
        for hook in hooks:
            hook.remove()
        # scoring: policy and reference; the update: 2 epochs x 2 minibatches
        assert ran == [getattr(torch, dtype)] * 6, ran
        assert scored.old_logprobs.dtype == scored.old_values.dtype == torch.float32
        weight = policy.lm.model.layers[-1].mlp.down_proj.weight
        assert weight.dtype == torch.float32 and not torch.equal(weight, before)
        assert all(math.isfinite(v) for v in stats.values()), stats
        old[dtype] = scored.old_logprobs
    assert not torch.equal(old["float32"], old["bfloat16"])
    gap = (old["float32"] - old["bfloat16"]).abs().max()
    assert 0 < gap <= 0.1, gap
    assert PPOConfig(dtype="auto").resolved_dtype() == getattr(torch, choose_dtype("auto").dtype)
