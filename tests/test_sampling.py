"""utils/sampling.py against transformers' logits processors: identical filtered logits, ties and boundaries.

Random logits are drawn from a few integer levels so that many values tie (the cases where top-k/top-p
implementations usually differ), plus some -inf entries, at batch > 1.
"""
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList, MinPLogitsWarper, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from utils.sampling import (TIE_SLACK, ContextState, SamplerConfig, choose, min_p_filter, no_repeat_ngram_mask,
                            repetition_penalty, sample_no_sync, temperature, top_k_candidates_as_logits,
                            top_k_filter, top_p_filter, warp)

B, V = 4, 37


def tied_logits(seed, b=B, v=V, levels=6, with_inf=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-levels, levels, (b, v), generator=g).float() * 0.7
    x += torch.randn(b, v, generator=g) * (torch.rand(b, v, generator=g) < 0.3)  # some distinct values
    if with_inf:
        x[torch.rand(b, v, generator=g) < 0.1] = -float("inf")
    return x


def assert_same(a, b):
    assert a.shape == b.shape
    assert torch.equal(torch.isinf(a), torch.isinf(b)), "different tokens filtered"
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def context_ids(seed, b=B, t=23, v=V):
    return torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_hf(penalty):
    for seed in range(3):
        logits, ids = tied_logits(seed, with_inf=False), context_ids(seed)
        ctx = ContextState(SamplerConfig(repetition_penalty=penalty), V)
        ctx.setup(B, 40, "cpu")
        ctx.reset(ids)
        ours = repetition_penalty(logits, ctx.rep_counts[:, :V] > 0, penalty)
        assert_same(ours, RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()))


@pytest.mark.parametrize("t", [0.3, 0.8, 1.0, 1.7])
def test_temperature_matches_hf(t):
    logits = tied_logits(0)
    assert_same(temperature(logits, t), TemperatureLogitsWarper(t)(None, logits.clone()))


@pytest.mark.parametrize("k", [1, 2, 5, V - 1, V, V + 10])
@pytest.mark.parametrize("keep", [1, 3])
def test_top_k_matches_hf_with_ties_and_k_beyond_vocab(k, keep):
    for seed in range(4):
        logits = tied_logits(seed)
        assert_same(top_k_filter(logits, k, keep), TopKLogitsWarper(k, min_tokens_to_keep=keep)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 0.5, 0.9, 0.95, 0.999, 1.0])
@pytest.mark.parametrize("keep", [1, 4])
def test_top_p_matches_hf_with_ties_and_boundaries(p, keep):
    for seed in range(4):
        logits = tied_logits(seed)
        assert_same(top_p_filter(logits, p, keep), TopPLogitsWarper(p, min_tokens_to_keep=keep)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.0, 0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("keep", [1, 3, V + 5])
def test_min_p_matches_hf(p, keep):
    for seed in range(4):
        logits = tied_logits(seed)
        assert_same(min_p_filter(logits, p, keep), MinPLogitsWarper(p, min_tokens_to_keep=keep)(None, logits.clone()))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_hf_on_a_partly_filled_buffer(n):
    v = 5  # a small vocabulary so n-grams repeat often
    for seed in range(3):
        for cur_len in [0, 1, n - 1, n, n + 1, 17]:
            logits = tied_logits(seed, v=v, with_inf=False)
            buf = torch.randint(0, v, (B, 20), generator=torch.Generator().manual_seed(seed + 100))
            ids = buf[:, :cur_len]
            banned = no_repeat_ngram_mask(buf, torch.tensor([cur_len]), n, v)  # columns >= cur_len: garbage
            hf = NoRepeatNGramLogitsProcessor(n)(ids, logits.clone())
            assert_same(logits.masked_fill(banned, -float("inf")), hf)


def slow_freq_presence(logits, gen_ids, freq, pres):
    out = logits.double().clone()
    for b, row in enumerate(gen_ids.tolist()):
        for tok, c in Counter(row).items():
            out[b, tok] -= freq * c + pres
    return out.float()


@pytest.mark.parametrize("window", [0, 5])
def test_running_context_state_matches_hf_on_the_full_context_every_step(window):
    """20 decode steps: the incremental buffers give what HF computes from the whole input_ids each time."""
    cfg = SamplerConfig(temperature=0.7, top_k=9, top_p=0.8, min_p=0.05, repetition_penalty=1.4,
                        repetition_window=window, frequency_penalty=0.3, presence_penalty=0.2, no_repeat_ngram_size=2)
    prompt = context_ids(1, t=7, v=V)
    ctx = ContextState(cfg, V)
    ctx.setup(B, 40, "cpu")
    ctx.reset(prompt)
    ids = prompt.clone()
    torch.manual_seed(0)
    for step in range(20):
        logits = tied_logits(1000 + step, with_inf=False)
        cur_len = ids.shape[1]
        ours = warp(ctx.process(logits, torch.tensor([cur_len])), cfg)
        # reference: HF processors on the full context, frequency/presence by a slow loop
        ref = RepetitionPenaltyLogitsProcessor(1.4)(ids[:, -window:] if window else ids, logits.clone())
        ref = slow_freq_presence(ref, ids[:, prompt.shape[1]:], 0.3, 0.2)
        ref = LogitsProcessorList([NoRepeatNGramLogitsProcessor(2), TemperatureLogitsWarper(0.7),
                                   TopKLogitsWarper(9), TopPLogitsWarper(0.8), MinPLogitsWarper(0.05)])(ids, ref)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        tok = sample_no_sync(torch.softmax(ours, -1))
        assert torch.isfinite(ours.gather(1, tok[:, None])).all(), "sampled a filtered token"
        ctx.append(tok, torch.tensor([cur_len]))
        ids = torch.cat([ids, tok[:, None]], 1)
    assert torch.equal(ctx.tokens[:, :ids.shape[1]], ids)


def test_exponential_race_draws_from_the_distribution():
    """argmax(p / Exp(1)) is a draw from p: frequencies within 5 standard errors over 40k draws."""
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03, 0.0])
    n = 40_000
    draws = sample_no_sync(p.expand(n, -1).contiguous())
    freq = torch.bincount(draws, minlength=len(p)).float() / n
    se = (p * (1 - p) / n).sqrt()
    assert freq[-1] == 0, "a zero-probability token was drawn"
    assert ((freq - p).abs() <= 5 * se + 1e-9).all(), (freq, p)


def test_greedy_is_argmax_and_sampling_respects_filters_and_seed():
    logits = tied_logits(3, with_inf=False)
    assert torch.equal(choose(logits, SamplerConfig(temperature=0)), logits.argmax(-1))
    cfg = SamplerConfig(temperature=1.0, top_k=3, top_p=1.0)
    allowed = top_k_filter(logits, 3).isfinite()
    torch.manual_seed(5)
    a = torch.stack([choose(logits, cfg) for _ in range(200)], 1)       # (B, 200)
    assert allowed.gather(1, a).all()
    torch.manual_seed(5)
    b = torch.stack([choose(logits, cfg) for _ in range(200)], 1)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2),
                                 dict(repetition_penalty=0), dict(top_k=-1), dict(no_repeat_ngram_size=-2)])
def test_bad_sampler_settings_raise_one_clear_error(bad):
    with pytest.raises(ValueError, match="must be"):
        SamplerConfig(**bad).validate()


@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_top_p_exact_mass_boundary(p):
    """Uniform over 4 tokens: cumulative masses are exact, so the <= at the cut-off decides the kept set."""
    logits = torch.zeros(2, 4)
    ours = top_p_filter(logits, p)
    assert_same(ours, TopPLogitsWarper(p)(None, logits.clone()))
    assert int(ours.isfinite().sum(-1)[0]) == round(p * 4)


@pytest.mark.parametrize("v", [V, 300])
@pytest.mark.parametrize("k,p,t,keep", [(5, 1.0, 1.0, 1), (5, 0.9, 0.8, 1), (20, 0.95, 0.8, 1), (1, 0.5, 1.0, 1),
                                        (12, 0.3, 1.3, 3), (50, 0.95, 0.8, 1), (400, 0.9, 1.0, 2)])
def test_fast_top_k_top_p_keeps_what_the_hf_warpers_keep(v, k, p, t, keep):
    """The decode-time path (top-k candidates only, no vocabulary sort) = temperature + top-k + top-p warpers,
    ties at the k-th logit included."""
    cfg = SamplerConfig(temperature=t, top_k=k, top_p=p, min_tokens_to_keep=keep)
    for seed in range(6):
        logits = tied_logits(seed, v=v, levels=40)
        fast, overflow = top_k_candidates_as_logits(logits, cfg)
        assert not overflow.any()
        procs = [TemperatureLogitsWarper(t), TopKLogitsWarper(k, min_tokens_to_keep=keep)]
        if p < 1.0:
            procs.append(TopPLogitsWarper(p, min_tokens_to_keep=keep))
        for ref in (LogitsProcessorList(procs)(None, logits.clone()), warp(logits, cfg)):
            assert_same_up_to_tie_order(fast, ref)


def assert_same_up_to_tie_order(a, b):
    """The same logits kept per row; where tied values straddle the top-p cut-off, which of the tied tokens
    stay depends on the sort's order of equal keys (it differs between torch's CPU and CUDA sorts too), so
    only tokens strictly above the smallest kept value must be the same tokens."""
    for ra, rb in zip(a, b):
        ka, kb = ra[ra.isfinite()].sort().values, rb[rb.isfinite()].sort().values
        assert torch.equal(ka, kb), "different logits kept"
        if len(ka):
            above = ka[0]
            assert torch.equal(ra > above, rb > above)


def test_fast_path_flags_more_ties_than_its_slack():
    cfg = SamplerConfig(temperature=1.0, top_k=5, top_p=1.0)
    logits = torch.zeros(2, 5 + TIE_SLACK + 10)
    logits[1, :3] = 1.0  # row 1: the 5th largest is tied with TIE_SLACK + 7 others -> still too many
    logits[1, 3:] = torch.arange(logits.shape[1] - 3).float() * -1e-3  # row 1 has no ties after all
    logits[0] = 0.0
    _, overflow = top_k_candidates_as_logits(logits, cfg)
    assert overflow.tolist() == [True, False]
    buf = torch.zeros(2, dtype=torch.bool)
    choose(logits, cfg, overflow=buf)
    assert buf.tolist() == [True, False]


def test_fast_path_samples_only_kept_tokens_in_proportion():
    torch.manual_seed(0)
    logits = torch.randn(1, 500) * 3
    cfg = SamplerConfig(temperature=0.8, top_k=10, top_p=0.9)
    probs = torch.softmax(warp(logits, cfg), -1)[0]
    n = 20_000
    draws = torch.stack([choose(logits.expand(50, -1), cfg) for _ in range(n // 50)]).flatten()
    freq = torch.bincount(draws, minlength=500).float() / n
    assert (freq[probs == 0] == 0).all()
    se = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * se + 1e-9).all()
