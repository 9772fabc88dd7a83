"""The KD losses against hand-worked values and torch references: temperature, masks, chunking, top-k targets, hidden
states."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compactlm.distillation.losses import (
    chunked_cross_entropy,
    forward_kl,
    generalized_jsd,
    hidden_state_loss,
    kd_loss,
    reverse_kl,
    sampled_kd_loss,
    topk_kd_loss,
    total_variation,
)

KINDS = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd, "tv": total_variation}


@pytest.mark.parametrize("kind", list(KINDS))
def test_identical_distributions_give_zero(kind):
    logits = torch.randn(2, 5, 11) * 3
    assert KINDS[kind](logits, logits.clone(), temperature=1.7).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, logits.clone(), None, kind, 1.7, chunk_size=3).item() == pytest.approx(0.0, abs=1e-6)


def test_hand_worked_two_token_example():
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))   # p
    student = torch.log(torch.tensor([[0.25, 0.75]]))  # q
    # KL(p||q) = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln(4/3)
    assert forward_kl(student, teacher).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    # KL(q||p) = .25 ln(.25/.5) + .75 ln(.75/.5)
    assert reverse_kl(student, teacher).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5),
                                                                 rel=1e-5)
    assert total_variation(student, teacher).item() == pytest.approx(0.25, rel=1e-6)
    # JSD(0.5): m = [.375, .625]
    m = [0.375, 0.625]
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) \
        + 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]))
    assert generalized_jsd(student, teacher, beta=0.5).item() == pytest.approx(jsd, rel=1e-5)


def test_forward_kl_matches_torch_kl_div():
    s, t = torch.randn(3, 4, 17), torch.randn(3, 4, 17)
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    assert forward_kl(s, t).item() == pytest.approx(ref.item(), rel=1e-5)
    assert reverse_kl(s, t).item() == pytest.approx(forward_kl(t, s).item(), rel=1e-5)


def test_jsd_symmetric_at_half_and_bounded_by_log2():
    # fixed draws: with whatever the global generator held, a draw can make beta=0.2 symmetric to 2e-4 (CI saw one)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, 13, generator=g) * 4, torch.randn(4, 6, 13, generator=g) * 4
    assert generalized_jsd(s, t, beta=0.5).item() == pytest.approx(generalized_jsd(t, s, beta=0.5).item(), rel=1e-5)
    assert generalized_jsd(s, t, beta=0.2).item() != pytest.approx(generalized_jsd(t, s, beta=0.2).item(), rel=1e-3)
    # disjoint one-hot distributions reach the bound log 2; nothing exceeds it
    far_s = torch.full((1, 13), -1e4).index_fill(1, torch.tensor([0]), 1e4)
    far_t = torch.full((1, 13), -1e4).index_fill(1, torch.tensor([5]), 1e4)
    assert generalized_jsd(far_s, far_t).item() == pytest.approx(math.log(2), rel=1e-4)
    for beta in (0.1, 0.5, 0.9):
        assert generalized_jsd(s * 10, t * 10, beta=beta).item() <= math.log(2) + 1e-6
    assert total_variation(far_s, far_t).item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_temperature_softens_both_and_scales_by_t_squared(kind):
    s, t = torch.randn(2, 3, 9) * 2, torch.randn(2, 3, 9) * 2
    T = 2.5
    expected = T**2 * KINDS[kind](s / T, t / T, temperature=1.0)
    assert KINDS[kind](s, t, temperature=T).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(s, t, None, kind, T, chunk_size=2).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_masked_tokens_are_ignored(kind):
    s, t = torch.randn(2, 6, 10), torch.randn(2, 6, 10)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    expected = KINDS[kind](s[mask], t[mask])  # only the 5 selected tokens, flattened
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = 1e3 * torch.randn_like(s2[~mask]), float("nan")  # garbage where the mask is off
    assert KINDS[kind](s, t, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(s2, t2, mask, kind, chunk_size=2).item() == pytest.approx(expected.item(), rel=1e-5)
    assert KINDS[kind](s, t, mask.long()).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_chunked_equals_unchunked_value_and_gradient(kind):
    torch.manual_seed(0)
    s = (torch.randn(3, 7, 23) * 2).requires_grad_(True)
    t = torch.randn(3, 7, 23) * 2
    mask = torch.rand(3, 7) > 0.3
    ref = KINDS[kind](s, t, mask, temperature=1.5)
    (g_ref,) = torch.autograd.grad(ref, s)
    for chunk in (1, 4, 1000):
        out = kd_loss(s, t, mask, kind, temperature=1.5, chunk_size=chunk)
        (g,) = torch.autograd.grad(out, s)
        assert out.item() == pytest.approx(ref.item(), rel=1e-5)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)


def test_bf16_logits_are_upcast_and_empty_mask_is_zero():
    s, t = torch.randn(2, 4, 50), torch.randn(2, 4, 50)
    ref = forward_kl(s, t)
    got = kd_loss(s.bfloat16(), t.bfloat16(), None, "forward_kl", chunk_size=3)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=2e-2)
    s.requires_grad_(True)
    zero = kd_loss(s, t, torch.zeros(2, 4, dtype=torch.bool))
    zero.backward()
    assert zero.item() == 0.0 and torch.all(s.grad == 0)


def test_chunked_cross_entropy_matches_torch():
    logits, labels = torch.randn(2, 5, 31), torch.randint(0, 31, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 1]], dtype=torch.bool)
    ref = F.cross_entropy(logits[mask], labels[mask])
    assert chunked_cross_entropy(logits, labels, mask, chunk_size=2).item() == pytest.approx(ref.item(), rel=1e-5)


def test_loss_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="shared vocabulary"):
        kd_loss(torch.randn(2, 10), torch.randn(2, 12), None)
    with pytest.raises(ValueError, match="unknown KD loss kind"):
        kd_loss(torch.randn(2, 10), torch.randn(2, 10), None, kind="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="jsd_beta"):
        kd_loss(torch.randn(2, 10), torch.randn(2, 10), None, kind="jsd", jsd_beta=1.0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_topk_loss_with_all_but_one_id_equals_full_kd(kind):
    """k = V - 1: the rest bucket is the single remaining id, so the coarse loss is the full-vocabulary one."""
    torch.manual_seed(0)
    V = 13
    s, t = (torch.randn(2, 5, V) * 2).requires_grad_(True), torch.randn(2, 5, V) * 2
    mask = torch.rand(2, 5) > 0.3
    t_logp = F.log_softmax(t, -1)
    lp, ids = t_logp.topk(V - 1, dim=-1)
    for T in (1.0, 2.0):
        ref = kd_loss(s, t, mask, kind, T)
        got = topk_kd_loss(s, ids, lp, mask, kind, T, chunk_size=3)
        assert got.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
        (g_ref,), (g,) = torch.autograd.grad(ref, s), torch.autograd.grad(got, s)
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-6)


def test_topk_loss_hand_worked_rest_bucket_and_lower_bound():
    # teacher p = [.5, .3, .2] stored as top-1 {id 0: log .5}: coarse p = [.5, .5 (rest)]
    # student q = [.25, .25, .5] -> coarse q = [.25, .75]; KL = .5 ln(.5/.25) + .5 ln(.5/.75)
    s = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    got = topk_kd_loss(s, torch.tensor([[0]]), torch.log(torch.tensor([[0.5]])).half(), None)
    assert got.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), rel=1e-3)
    # the coarse KL never exceeds the full KL (data processing), for any k
    torch.manual_seed(1)
    s, t = torch.randn(64, 50) * 3, torch.randn(64, 50) * 3
    full = forward_kl(s, t).item()
    for k in (1, 5, 20, 49):
        lp, ids = F.log_softmax(t, -1).topk(k, dim=-1)
        assert topk_kd_loss(s, ids, lp, None).item() <= full + 1e-5
    # fp16-rounded top-k whose mass reaches 1 (a one-hot teacher) stays finite
    lp = torch.zeros(3, 1, dtype=torch.float16)
    assert math.isfinite(topk_kd_loss(torch.randn(3, 50), torch.zeros(3, 1, dtype=torch.long), lp, None).item())
    with pytest.raises(ValueError, match="leading shape"):
        topk_kd_loss(torch.randn(2, 4, 50), torch.zeros(2, 3, 5, dtype=torch.long), torch.zeros(2, 3, 5), None)


def _draws(t_logp: torch.Tensor, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k ids per row drawn from exp(t_logp) with replacement (as generation's logit_targets: sampled), log-probs."""
    ids = torch.multinomial(t_logp.exp().reshape(-1, t_logp.shape[-1]), k, replacement=True, generator=g)
    ids = ids.reshape(*t_logp.shape[:-1], k)
    return ids, t_logp.gather(-1, ids)


def test_sampled_targets_are_unbiased_for_forward_kl_and_its_gradient():
    """Mean over many independent draws of the sampled-target loss (and of its gradient) is the exact full-vocabulary
    forward KL (and its gradient); the top-k loss at the same k stays biased low."""
    torch.manual_seed(0)
    V, k, draws = 40, 4, 4000
    s, t = (torch.randn(6, V) * 2).requires_grad_(True), torch.randn(6, V) * 2
    t_logp = F.log_softmax(t, -1)
    exact = forward_kl(s, t)
    (g_exact,) = torch.autograd.grad(exact, s)
    g = torch.Generator().manual_seed(1)
    values, grads = [], torch.zeros_like(s)
    for _ in range(draws):
        ids, lp = _draws(t_logp, k, g)
        loss = sampled_kd_loss(s, ids, lp, None, chunk_size=4)
        values.append(loss.item())
        grads += torch.autograd.grad(loss, s)[0] / draws
    mean, sd = torch.tensor(values).mean().item(), torch.tensor(values).std().item()
    assert abs(mean - exact.item()) < 4 * sd / math.sqrt(draws), (mean, exact.item(), sd)
    torch.testing.assert_close(grads, g_exact, rtol=0, atol=0.003)
    lp, ids = t_logp.topk(k, dim=-1)
    assert topk_kd_loss(s, ids, lp, None).item() < exact.item() - 10 * sd / math.sqrt(draws)


def test_sampled_loss_hand_worked_masking_fp16_and_errors():
    # q = [.25, .25, .5], draws {0, 0, 2} with teacher log-probs log .5, log .5, log .2:
    # (1/3) [(ln .5 - ln .25) * 2 + (ln .2 - ln .5)]
    s = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    ids, lp = torch.tensor([[0, 0, 2]]), torch.log(torch.tensor([[0.5, 0.5, 0.2]]))
    want = (2 * math.log(2) + math.log(0.4)) / 3
    assert sampled_kd_loss(s, ids, lp.half(), None).item() == pytest.approx(want, rel=1e-3)
    # masked rows are never read (they may hold filler); no masked row -> 0
    s2 = torch.cat([s, torch.randn(1, 3)])[None]
    ids2, lp2 = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)])[None], torch.cat([lp, torch.zeros(1, 3)])[None]
    assert sampled_kd_loss(s2, ids2, lp2, torch.tensor([[True, False]])).item() == pytest.approx(want, rel=1e-4)
    assert sampled_kd_loss(s2, ids2, lp2, torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="leading shape"):
        sampled_kd_loss(torch.randn(2, 4, 50), torch.zeros(2, 3, 5, dtype=torch.long), torch.zeros(2, 3, 5), None)


def test_hidden_state_loss_values():
    a = torch.randn(2, 3, 8)
    assert hidden_state_loss(a, a * 3.0, None, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_state_loss(a, -a, None, "cosine").item() == pytest.approx(2.0, abs=1e-6)
    mask = torch.tensor([[1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    assert hidden_state_loss(a, a + 2.0, mask, "mse").item() == pytest.approx(4.0, rel=1e-6)
    with pytest.raises(ValueError, match="project"):
        hidden_state_loss(a, torch.randn(2, 3, 9), None)


# ---------------------------------------------------------------------------------- another tokenizer (ULD)

def test_uld_is_zero_for_the_same_distribution_in_any_vocabulary_order():
    from compactlm.distillation.losses import uld_loss

    s = torch.randn(2, 5, 9) * 3
    assert uld_loss(s, s.clone(), None).item() == pytest.approx(0.0, abs=1e-6)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    assert uld_loss(s, s[..., perm], None).item() == pytest.approx(0.0, abs=1e-6)  # blind to token identity
    # the same distribution over a bigger vocabulary (extra ids at probability ~0): still ~0
    t = torch.cat([s, torch.full((2, 5, 4), -1e4)], dim=-1)
    assert uld_loss(s, t, None).item() == pytest.approx(0.0, abs=1e-6)


def test_uld_hand_worked_values_and_masking():
    from compactlm.distillation.losses import uld_loss

    # student p = [.5, .5]; teacher q = [.25, .25, .5] -> sorted q = [.5, .25, .25], p padded = [.5, .5, 0]
    p, q = torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    assert uld_loss(p, q, None).item() == pytest.approx(0.5, rel=1e-6)
    # p = [.7, .2, .1] vs q = [.1, .6, .3]: sorted [.7, .2, .1] vs [.6, .3, .1] -> .1 + .1 + 0
    p3, q3 = torch.log(torch.tensor([[0.7, 0.2, 0.1]])), torch.log(torch.tensor([[0.1, 0.6, 0.3]]))
    assert uld_loss(p3, q3, None).item() == pytest.approx(0.2, rel=1e-5)
    # masked positions do not count, whatever they hold; the mean is over the selected ones
    s, t = torch.cat([p3, p3]).unsqueeze(0), torch.cat([q3, torch.full((1, 3), float("nan"))]).unsqueeze(0)
    assert uld_loss(s, t, torch.tensor([[True, False]])).item() == pytest.approx(0.2, rel=1e-5)
    assert uld_loss(s, t, torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="same positions"):
        uld_loss(torch.randn(2, 3, 5), torch.randn(2, 4, 7), None)


def test_uld_chunked_value_and_gradient_match_one_shot():
    from compactlm.distillation.losses import uld_loss

    torch.manual_seed(0)
    s = (torch.randn(3, 6, 11) * 2).requires_grad_(True)
    t = torch.randn(3, 6, 17) * 2
    mask = torch.rand(3, 6) > 0.3
    ref = uld_loss(s, t, mask, chunk_size=10_000)
    (g_ref,) = torch.autograd.grad(ref, s)
    for chunk in (1, 4):
        out = uld_loss(s, t, mask, temperature=1.0, chunk_size=chunk)
        (g,) = torch.autograd.grad(out, s)
        assert out.item() == pytest.approx(ref.item(), rel=1e-5)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)
