"""Policy losses, KL and entropy against hand-computed examples, gradient checks and input errors."""

import math

import pytest
import torch

from megatron_longact.rl import kl as rl_kl
from megatron_longact.rl.losses import LOSS_AGG_MODES, agg_loss, policy_loss, policy_loss_names

F64 = torch.float64


def hand_batch():
    """Two responses of length 3, the second padded after 2 tokens.

    old_log_probs = 0 and log_probs = log r, so the ratios are exactly r:
      row 0, A = +1, r = [1.5, 0.9, 1.0], mask [1, 1, 1]
      row 1, A = -1, r = [0.5, 4.0, 7.0], mask [1, 1, 0]   (7.0 is padding and must not count)
    """
    ratio = torch.tensor([[1.5, 0.9, 1.0], [0.5, 4.0, 7.0]], dtype=F64)
    return ratio.log(), torch.zeros(2, 3, dtype=F64), torch.tensor([1.0, -1.0], dtype=F64), \
        torch.tensor([[1, 1, 1], [1, 1, 0]])


# Per-token losses of hand_batch with eps = 0.2, l = max(-A r, -A clip(r, 0.8, 1.2)):
#   row 0 (A = +1): r=1.5 -> max(-1.5, -1.2) = -1.2 (upper clip); r=0.9 -> -0.9; r=1.0 -> -1.0
#   row 1 (A = -1): r=0.5 -> max(0.5, 0.8) = 0.8 (lower clip);   r=4.0 -> max(4.0, 1.2) = 4.0
# row sums: -3.1 and 4.8; total 1.7 over 5 tokens.
HAND_PPO = {
    "token-mean": 1.7 / 5,                             # 0.34
    "seq-mean-token-mean": (-3.1 / 3 + 4.8 / 2) / 2,   # 41/60
    "seq-mean-token-sum": (-3.1 + 4.8) / 2,            # 0.85
    "seq-mean-token-sum-norm": 1.7 / 3,                # default constant: response_len = 3
}


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_ppo_hand_example_every_mode(mode):
    loss, _ = policy_loss("ppo", *hand_batch(), loss_agg_mode=mode)
    assert loss.item() == pytest.approx(HAND_PPO[mode], abs=1e-12)


def test_same_surrogate_names_differ_only_by_defaults():
    # grpo, dr_grpo and ppo share eps = 0.2; their defaults pick seq-mean-token-mean,
    # seq-mean-token-sum-norm and token-mean.
    assert policy_loss("grpo", *hand_batch())[0].item() == pytest.approx(HAND_PPO["seq-mean-token-mean"])
    assert policy_loss("dr_grpo", *hand_batch())[0].item() == pytest.approx(HAND_PPO["seq-mean-token-sum-norm"])
    assert policy_loss("ppo", *hand_batch())[0].item() == pytest.approx(HAND_PPO["token-mean"])
    # An explicit constant: 1.7 / 10.
    loss, _ = policy_loss("dr_grpo", *hand_batch(), loss_scale_factor=10)
    assert loss.item() == pytest.approx(0.17)


def test_dual_clip_and_metrics():
    # clip_ratio_c = 3 bounds row 1, token 2 (A = -1, r = 4): min(4.0, -A * 3 = 3.0) = 3.0.
    # Total becomes 1.7 - 1.0 = 0.7 over 5 tokens = 0.14.
    loss, metrics = policy_loss("ppo", *hand_batch(), clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(0.14)
    # One token of five for each clip kind: r=1.5 (A>0, upper), r=0.5 (A<0, lower), r=4 (A<0, > c).
    assert metrics["clip_frac_high"].item() == pytest.approx(0.2)
    assert metrics["clip_frac_low"].item() == pytest.approx(0.2)
    assert metrics["clip_frac_dual"].item() == pytest.approx(0.2)
    assert metrics["clip_frac"].item() == pytest.approx(0.4)
    # Ratios over the 5 selected tokens: mean (1.5 + 0.9 + 1 + 0.5 + 4) / 5 = 1.58, min 0.5, max 4.
    assert metrics["ratio_mean"].item() == pytest.approx(1.58)
    assert metrics["ratio_min"].item() == pytest.approx(0.5)
    assert metrics["ratio_max"].item() == pytest.approx(4.0)
    # k1 of KL(old || new): mean of -log r; k3: mean of (r - 1) - log r.
    r = torch.tensor([1.5, 0.9, 1.0, 0.5, 4.0], dtype=F64)
    assert metrics["approx_kl_k1"].item() == pytest.approx((-r.log()).mean().item(), rel=1e-6)
    assert metrics["approx_kl"].item() == pytest.approx((r - 1 - r.log()).mean().item(), rel=1e-6)
    assert metrics["num_tokens"].item() == 5 and metrics["num_seqs"].item() == 2
    for value in metrics.values():
        assert value.dtype == torch.float32 and not value.requires_grad
    # Without the dual clip nothing is counted as dual-clipped.
    assert policy_loss("ppo", *hand_batch())[1]["clip_frac_dual"].item() == 0


def test_dapo_clip_higher_and_clip_precedence():
    # dapo: eps_low 0.2, eps_high 0.28: row 0 token 1 becomes max(-1.5, -1.28) = -1.28,
    # total -1.28 - 0.9 - 1.0 + 0.8 + 4.0 = 1.62 over 5 tokens (token-mean).
    assert policy_loss("dapo", *hand_batch())[0].item() == pytest.approx(1.62 / 5)
    # A given clip_ratio replaces both defaults: eps = 0.1 -> -1.1 - 0.9 - 1.0 + 0.9 + 4.0 = 1.9.
    assert policy_loss("dapo", *hand_batch(), clip_ratio=0.1)[0].item() == pytest.approx(1.9 / 5)
    # clip_high wins over clip_ratio: (0.1, 0.3) -> -1.3 - 0.9 - 1.0 + 0.9 + 4.0 = 1.7.
    loss, _ = policy_loss("dapo", *hand_batch(), clip_ratio=0.1, clip_high=0.3)
    assert loss.item() == pytest.approx(1.7 / 5)


def test_advantages_per_response_or_per_token():
    log_probs, old, adv_B, mask = hand_batch()
    adv_BT = adv_B[:, None].expand(2, 3).clone()
    for name in policy_loss_names():
        a, _ = policy_loss(name, log_probs, old, adv_B, mask)
        b, _ = policy_loss(name, log_probs, old, adv_BT, mask)
        assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_gspo_hand_example_value_and_gradient():
    # Row 0, A = +1, mask [1, 1, 0], log ratios [0.3, 0.1, 9 (padding)]: log s = 0.2, s = e^0.2 = 1.2214
    #   > 1 + 4e-4, clipped: both tokens have loss -(1 + 4e-4) = -1.0004 and no gradient.
    # Row 1, A = -2, mask [1, 1, 1], log ratios [-1e-3, 1e-3, -3e-4]: log s = -1e-4, s = e^-1e-4, inside
    #   [1 - 3e-4, 1 + 4e-4]: loss 2 s on each token.
    # seq-mean-token-mean: (-1.0004 + 2 e^-1e-4) / 2.
    log_ratio = torch.tensor([[0.3, 0.1, 9.0], [-1e-3, 1e-3, -3e-4]], dtype=F64)
    log_probs = log_ratio.clone().requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    loss, metrics = policy_loss("gspo", log_probs, torch.zeros(2, 3, dtype=F64), adv, mask)
    s1 = math.exp(-1e-4)
    assert loss.item() == pytest.approx((-1.0004 + 2 * s1) / 2, abs=1e-12)
    # Every token of row 0 is clipped (2 of 5 tokens).
    assert metrics["clip_frac_high"].item() == pytest.approx(0.4)
    loss.backward()
    # Row 1's loss share is (1/2) * (-A s) = s with d s / d log pi_t = s / |y| = s / 3 per token.
    expected = torch.tensor([[0.0, 0.0, 0.0], [s1 / 3] * 3], dtype=F64)
    torch.testing.assert_close(log_probs.grad, expected, rtol=1e-12, atol=1e-12)


def _random_case(seed, batch=3, length=4):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g, dtype=F64) * 2
    log_ratio = (torch.rand(batch, length, generator=g, dtype=F64) - 0.5) * 1.2  # r in [0.55, 1.8]
    adv = torch.randn(batch, length, generator=g, dtype=F64)
    mask = torch.ones(batch, length)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return old + log_ratio, old, adv, mask


@pytest.mark.parametrize("name", ["ppo", "grpo", "dapo", "dr_grpo", "gspo"])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_gradcheck(name, mode):
    log_probs, old, adv, mask = _random_case(seed=7)
    if name == "gspo":
        # One advantage per response (GSPO's setting, where the token form is exact). The sequence
        # ratios are 0.63 (A > 0), 1.02 (A > 0) and 1.66 (A < 0): clip_high = 0.01 clips the second
        # response only, away from its kink.
        adv = adv[:, 0]
        cfg = dict(clip_low=0.15, clip_high=0.01)
    else:
        cfg = dict(clip_ratio_c=1.6)

    def fn(lp):
        return policy_loss(name, lp, old, adv, mask, loss_agg_mode=mode, **cfg)[0]

    assert torch.autograd.gradcheck(fn, (log_probs.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


def test_gspo_gradient_equals_sequence_form():
    # GSPO's sequence objective written directly: -1/G sum_i min(s_i A_i, clip(s_i) A_i).
    log_probs, old, adv_BT, mask = _random_case(seed=3)
    adv = adv_BT[:, 0]
    lp1 = log_probs.clone().requires_grad_()
    policy_loss("gspo", lp1, old, adv, mask, clip_low=0.1, clip_high=0.1)[0].backward()
    lp2 = log_probs.clone().requires_grad_()
    s = torch.exp(((lp2 - old) * mask).sum(-1) / mask.sum(-1))
    direct = torch.maximum(-adv * s, -adv * s.clamp(0.9, 1.1)).mean()
    direct.backward()
    torch.testing.assert_close(lp1.grad, lp2.grad)


def test_low_precision_inputs_give_float32_loss():
    log_probs, old, adv, mask = hand_batch()
    loss, _ = policy_loss("dapo", log_probs.bfloat16(), old.bfloat16(), adv.bfloat16(), mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(1.62 / 5, rel=1e-2)


def test_empty_micro_batch_with_global_counts():
    log_probs, old, adv, _ = hand_batch()
    empty = torch.zeros(2, 3)
    lp = log_probs.clone().requires_grad_()
    loss, metrics = policy_loss("grpo", lp, old, adv, empty, global_num_tokens=10, global_num_seqs=4)
    loss.backward()
    assert loss.item() == 0 and torch.all(lp.grad == 0)
    assert metrics["ratio_min"].item() == math.inf and metrics["ratio_max"].item() == -math.inf
    assert metrics["clip_frac"].item() == 0


def test_global_counts_divide_local_sum():
    # token-mean: 1.7 / 10; seq-mean-token-mean: (-3.1/3 + 4.8/2) / 4; seq-mean-token-sum: 1.7 / 4.
    counts = dict(global_num_tokens=10, global_num_seqs=4)
    assert policy_loss("ppo", *hand_batch(), **counts)[0].item() == pytest.approx(0.17)
    assert policy_loss("grpo", *hand_batch(), **counts)[0].item() == pytest.approx((-3.1 / 3 + 2.4) / 4)
    loss, _ = policy_loss("ppo", *hand_batch(), loss_agg_mode="seq-mean-token-sum", **counts)
    assert loss.item() == pytest.approx(1.7 / 4)


@pytest.mark.parametrize("kwargs, field", [
    (dict(clip_ratio=1.5), "clip_ratio"),
    (dict(clip_ratio=0.0), "clip_ratio"),
    (dict(clip_low=1.0), "clip_low"),
    (dict(clip_low=-0.1), "clip_low"),
    (dict(clip_high=0.0), "clip_high"),
    (dict(clip_high=math.inf), "clip_high"),
    (dict(clip_ratio_c=1.0), "clip_ratio_c"),
    (dict(clip_ratio_c=0.5), "clip_ratio_c"),
    (dict(loss_agg_mode="mean"), "loss_agg_mode"),
    (dict(loss_scale_factor=0), "loss_scale_factor"),
    (dict(global_num_tokens=0, global_num_seqs=1), "global_num_tokens"),
    (dict(global_num_seqs=2), "global_num_tokens"),  # token-mean needs the token count
    (dict(clip_ration=0.2), "clip_ration"),
])
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        policy_loss("ppo", *hand_batch(), **kwargs)


def test_errors_for_names_shapes_masks():
    log_probs, old, adv, mask = hand_batch()
    with pytest.raises(ValueError, match=r"name: got 'grpo2', expected one of \['dapo', 'dr_grpo'"):
        policy_loss("grpo2", log_probs, old, adv, mask)
    with pytest.raises(ValueError, match="old_log_probs: got shape"):
        policy_loss("ppo", log_probs, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="advantages: got shape"):
        policy_loss("ppo", log_probs, old, adv[:1], mask)
    with pytest.raises(ValueError, match="response_mask: got shape"):
        policy_loss("ppo", log_probs, old, adv, mask[0])
    with pytest.raises(ValueError, match="log_probs: got dtype"):
        policy_loss("ppo", log_probs.long(), old, adv, mask)
    for mode in LOSS_AGG_MODES:
        with pytest.raises(ValueError, match="response_mask: selects no tokens"):
            policy_loss("ppo", log_probs, old, adv, torch.zeros_like(mask), loss_agg_mode=mode)
    with pytest.raises(ValueError, match="global_num_seqs: got None"):
        policy_loss("grpo", log_probs, old, adv, mask, global_num_tokens=5)
    with pytest.raises(ValueError, match="loss_scale_factor: got None with global counts"):
        policy_loss("dr_grpo", log_probs, old, adv, mask, global_num_tokens=5, global_num_seqs=2)


def test_agg_loss_ignores_padding_values():
    # The padded 1e6 is multiplied by the mask's 0: (1 + 2) / 2.
    loss_BT = torch.tensor([[1.0, 2.0, 1e6]])
    assert agg_loss(loss_BT, torch.tensor([[1, 1, 0]]), "token-mean").item() == pytest.approx(1.5)


# --------------------------------------------------------------------------------------------------
# KL and entropy
# --------------------------------------------------------------------------------------------------

def test_kl_estimators_hand_values():
    # pi = 0.5, pi_ref = 0.25: d = log 2.
    #   k1 = log 2 = 0.693147; k2 = (log 2)^2 / 2 = 0.240227; k3 = 0.5 - 1 + log 2 = 0.193147.
    lp = torch.tensor([[math.log(0.5)]], dtype=F64)
    ref = torch.tensor([[math.log(0.25)]], dtype=F64)
    assert rl_kl.kl_estimate(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert rl_kl.kl_estimate(lp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert rl_kl.kl_estimate(lp, ref, "k3").item() == pytest.approx(math.log(2) - 0.5)
    assert rl_kl.kl_estimate(lp, ref, "k3", clamp=0.1).item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="kind: got 'k4'"):
        rl_kl.kl_estimate(lp, ref, "k4")
    with pytest.raises(ValueError, match="ref_log_probs: got shape"):
        rl_kl.kl_estimate(lp, ref[0])


def test_kl_gradients():
    # d k1 / d log pi = 1; d k2 / d log pi = d; d k3 / d log pi = 1 - pi_ref / pi.
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(2, 3, generator=g, dtype=F64)
    ref = -torch.rand(2, 3, generator=g, dtype=F64)
    for kind, expected in (("k1", torch.ones_like(lp)), ("k2", lp - ref), ("k3", 1 - (ref - lp).exp())):
        x = lp.clone().requires_grad_()
        rl_kl.kl_estimate(x, ref, kind).sum().backward()
        torch.testing.assert_close(x.grad, expected)
        assert torch.autograd.gradcheck(lambda t, k=kind: rl_kl.kl_estimate(t, ref, k),
                                        (lp.clone().requires_grad_(),))


def test_kl_loss_and_reward_penalty():
    lp = torch.tensor([[math.log(0.5), math.log(0.5), 0.0]], dtype=F64)
    ref = torch.tensor([[math.log(0.25), math.log(0.5), 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]])
    # k3 per token: [log 2 - 0.5, 0]; token-mean over 2 tokens.
    loss, metrics = rl_kl.kl_loss(lp, ref, mask)
    assert loss.item() == pytest.approx((math.log(2) - 0.5) / 2)
    assert metrics["kl"].item() == pytest.approx((math.log(2) - 0.5) / 2)
    # Reward penalty, k1, coefficient 0.1: the score 1.0 goes on the last response token (index 1),
    # every response token loses 0.1 * k1: [-0.1 log 2, 1 - 0], padding 0.
    rewards, _ = rl_kl.kl_penalty_rewards(torch.tensor([1.0]), lp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.1 * math.log(2), 1.0, 0.0]], dtype=F64))
    with pytest.raises(ValueError, match="kl_coef"):
        rl_kl.kl_penalty_rewards(torch.tensor([1.0]), lp, ref, mask, kl_coef=-1)
    with pytest.raises(ValueError, match="scores: got shape"):
        rl_kl.kl_penalty_rewards(torch.ones(2), lp, ref, mask, kl_coef=0.1)


def test_entropy_hand_values_and_gradcheck():
    # Uniform over 2: log 2. Probabilities (3/4, 1/4): -(0.75 log 0.75 + 0.25 log 0.25) = 0.562335.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]], dtype=F64)
    entropy = rl_kl.entropy_from_logits(logits)
    torch.testing.assert_close(entropy, torch.tensor([[math.log(2), 0.5623351446188083]], dtype=F64))
    loss, metrics = rl_kl.entropy_loss(logits, torch.tensor([[1, 0]]))
    assert loss.item() == pytest.approx(math.log(2)) and metrics["entropy"].item() == pytest.approx(math.log(2))
    x = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(rl_kl.entropy_from_logits, (x,))
    with pytest.raises(ValueError, match="logits: got shape"):
        rl_kl.entropy_loss(logits[0], torch.tensor([[1, 0]]))
