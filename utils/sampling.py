"""Logits processors and sampling for generate.py: transformers' arithmetic, static shapes, no host syncs.

Each filter below repeats the operations of its transformers counterpart (generation/logits_process.py,
transformers 5.x) so tests/test_sampling.py can demand identical filtered logits, ties included:

    repetition_penalty   RepetitionPenaltyLogitsProcessor  positive logits / penalty, negative * penalty
    no_repeat_ngram_mask NoRepeatNGramLogitsProcessor      ban the tokens that would repeat an n-gram
    temperature          TemperatureLogitsWarper
    top_k_filter         TopKLogitsWarper                  keeps every token tied with the k-th
    top_p_filter         TopPLogitsWarper
    min_p_filter         MinPLogitsWarper

They run in the order transformers' `generate` applies them (penalties, n-gram ban, then temperature,
top-k, top-p, min-p); frequency/presence penalties (OpenAI semantics, over generated tokens only, as in
vLLM) sit after the repetition penalty. What transformers recomputes from the whole `input_ids` every
token (which tokens were seen) is kept here as running counts in preallocated buffers (`ContextState`),
so a decode step has static shapes and can be captured in a CUDA graph; the tests check the running
state against transformers applied to the full context at every step.

With top-k on (and no min-p), `choose` never sorts the vocabulary: it filters and samples among the
top_k + TIE_SLACK largest logits (`top_k_top_p_candidates`), the same tokens with the same logits that
top_k_filter + top_p_filter keep (decode-time cost on an H200: see benchmarks/bench_decode.py). It is exact
unless more than TIE_SLACK logits tie with the k-th one; that case is flagged (`overflow`), never silent.

Sampling uses gpt-fast's exponential race (`sample_no_sync`): argmax(p / E) with E ~ Exp(1) draws index
i with probability p_i, like torch.multinomial, but without the host sync multinomial costs.
"""
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn

from kernels.topk import topk, triton_topk_available

NEG_INF = -float("inf")


@dataclass
class SamplerConfig:
    temperature: float = 0.8        # 0 = greedy (argmax after the penalties, as HF's do_sample=False)
    top_k: int = 50                 # 0 = off
    top_p: float = 0.95             # 1.0 = off
    min_p: float = 0.0              # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; HF semantics over the context (prompt + generated)
    repetition_window: int = 0      # >0: the repetition penalty looks only at the last N context tokens
    frequency_penalty: float = 0.0  # logit -= frequency * count(token in generated text)
    presence_penalty: float = 0.0   # logit -= presence * [token in generated text]
    no_repeat_ngram_size: int = 0   # 0 = off; n > 0: no n-gram occurs twice in the context
    min_tokens_to_keep: int = 1

    @property
    def greedy(self):
        return self.temperature == 0

    def validate(self):
        """One clear ValueError naming the bad setting (same ranges transformers accepts)."""
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top-k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top-p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min-p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition penalty must be > 0, got {self.repetition_penalty}"),
            (self.repetition_window >= 0, f"repetition window must be >= 0, got {self.repetition_window}"),
            (self.no_repeat_ngram_size >= 0, f"no-repeat-ngram size must be >= 0, got {self.no_repeat_ngram_size}"),
            (self.min_tokens_to_keep >= 1, f"min_tokens_to_keep must be >= 1, got {self.min_tokens_to_keep}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        return self

    def to_dict(self):
        return asdict(self)


# --- the filters, one per transformers processor ------------------------------------------------------

def repetition_penalty(logits, seen, penalty):
    """logits (B, V); seen (B, V) bool: tokens in the context. HF: seen positive / penalty, negative * penalty."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def frequency_presence_penalty(logits, counts, frequency, presence):
    """OpenAI's penalties: counts (B, V) of each token in the generated text."""
    counts = counts.to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def no_repeat_ngram_mask(tokens, cur_len, n, vocab_size):
    """Tokens that would complete an n-gram already in tokens[:, :cur_len] -> (B, V) bool.

    tokens (B, L) buffer whose first cur_len columns are the context (the rest is ignored); cur_len a
    0-d or (1,) long tensor so the shapes never depend on it. Window i (tokens[i:i+n]) is complete when
    i + n <= cur_len; it bans its last token if its first n-1 tokens equal the context's last n-1.
    """
    B, L = tokens.shape
    cur_len = cur_len.reshape(())
    windows = tokens.unfold(1, n, 1)                                   # (B, L-n+1, n)
    prefix_idx = (cur_len - (n - 1) + torch.arange(n - 1, device=tokens.device)).clamp(min=0)
    prefix = tokens[:, prefix_idx]                                     # (B, n-1) the context's last n-1
    matches = (windows[..., :-1] == prefix[:, None, :]).all(-1)        # (B, L-n+1)
    complete = torch.arange(L - n + 1, device=tokens.device) <= cur_len - n
    matches = matches & complete[None]
    # non-matching windows scatter into a spare column past the vocabulary (as transformers does)
    banned = torch.zeros(B, vocab_size + 1, dtype=torch.bool, device=tokens.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab_size), vocab_size), True)
    return banned[:, :vocab_size]


def temperature(logits, t):
    return logits / t


def top_k_filter(logits, k, min_tokens_to_keep=1):
    """Keep the k largest logits and every logit tied with the k-th; k larger than V keeps all."""
    k = min(max(k, min_tokens_to_keep), logits.size(-1))
    kth = torch.topk(logits, k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits, p, min_tokens_to_keep=1):
    """Keep the smallest set of most probable tokens whose mass reaches p (HF's ascending-sort form)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - p)
    remove[..., -min_tokens_to_keep:] = False
    remove = remove.scatter(1, sorted_idx, remove)
    return logits.masked_fill(remove, NEG_INF)


def min_p_filter(logits, p, min_tokens_to_keep=1):
    """Drop tokens whose probability is below p times the top token's probability."""
    probs = torch.softmax(logits, dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    k = min(min_tokens_to_keep, probs.shape[-1])
    remove.scatter_(-1, torch.topk(probs, k, dim=-1).indices, False)
    return logits.masked_fill(remove, NEG_INF)


# --- sampling --------------------------------------------------------------------------------------

def sample_no_sync(probs):
    """One index per row drawn from probs (B, V), without a host sync (gpt-fast's exponential race)."""
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1)


class ContextState(nn.Module):
    """What the penalties need to know about the context, in fixed-size buffers updated in place.

    tokens     (B, capacity) every context token (prompt + generated) at its absolute position
    rep_counts (B, V+1) occurrences in the repetition-penalty window (whole context if window == 0)
    gen_counts (B, V+1) occurrences in the generated tokens (frequency / presence penalties)
    Ids >= V (a VQA prompt's image placeholder may lie outside the vocabulary) count in the spare last
    column, as transformers' processors do.
    Buffers of an nn.Module have fixed addresses, so a CUDA graph can update them in place (like a KV cache).
    """

    def __init__(self, cfg: SamplerConfig, vocab_size):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.prompt_len = 0

    def setup(self, batch, capacity, device):
        def buf(name, shape, dtype):
            old = getattr(self, name, None)
            if old is None or old.shape != shape or old.device != torch.device(device):
                self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            else:
                old.zero_()
        buf("tokens", (batch, capacity), torch.long)
        buf("rep_counts", (batch, self.vocab_size + 1), torch.int32)
        buf("gen_counts", (batch, self.vocab_size + 1), torch.int32)

    @property
    def capacity(self):
        return self.tokens.shape[1]

    def reset(self, prompt_ids):
        """Fill from a (B, T) prompt; counts over the prompt's last `window` tokens."""
        B, T = prompt_ids.shape
        self.tokens.zero_()
        self.tokens[:, :T] = prompt_ids
        self.rep_counts.zero_()
        self.gen_counts.zero_()
        w = self.cfg.repetition_window
        recent = (prompt_ids[:, -w:] if w > 0 else prompt_ids).clamp(max=self.vocab_size)
        self.rep_counts.scatter_add_(1, recent, torch.ones_like(recent, dtype=torch.int32))
        self.prompt_len = T

    def append(self, tok, pos):
        """Write tok (B,) at absolute position pos ((1,) long tensor) and update the counts the penalties use
        (a sampler without penalties skips them: fewer kernels per decoded token)."""
        self.tokens.index_copy_(1, pos, tok[:, None])
        one = torch.ones_like(tok[:, None], dtype=torch.int32)
        c = self.cfg
        if c.repetition_penalty != 1.0:
            self.rep_counts.scatter_add_(1, tok[:, None], one)
            w = c.repetition_window
            if w > 0:  # the token w positions back leaves the window
                old_pos = (pos - w).clamp(min=0)
                old = self.tokens.index_select(1, old_pos).clamp(max=self.vocab_size)  # (B, 1)
                self.rep_counts.scatter_add_(1, old, -one * (pos >= w).to(torch.int32))
        if c.frequency_penalty != 0.0 or c.presence_penalty != 0.0:
            self.gen_counts.scatter_add_(1, tok[:, None], one)

    def process(self, logits, cur_len):
        """Penalties and the n-gram ban (HF's logits processors) for logits (B, V) at context length cur_len."""
        c = self.cfg
        if c.repetition_penalty != 1.0:
            logits = repetition_penalty(logits, self.rep_counts[:, :-1] > 0, c.repetition_penalty)
        if c.frequency_penalty != 0.0 or c.presence_penalty != 0.0:
            logits = frequency_presence_penalty(logits, self.gen_counts[:, :-1], c.frequency_penalty,
                                                c.presence_penalty)
        if c.no_repeat_ngram_size > 0:
            banned = no_repeat_ngram_mask(self.tokens, cur_len, c.no_repeat_ngram_size, logits.shape[-1])
            logits = logits.masked_fill(banned, NEG_INF)
        return logits


def warp(logits, cfg: SamplerConfig):
    """HF's sampling warpers in generate's order (each skipped when it would be a no-op, as generate does)."""
    if cfg.temperature != 1.0:
        logits = temperature(logits, cfg.temperature)
    if cfg.top_k != 0:
        logits = top_k_filter(logits, cfg.top_k, cfg.min_tokens_to_keep)
    if cfg.top_p < 1.0:
        logits = top_p_filter(logits, cfg.top_p, cfg.min_tokens_to_keep)
    if cfg.min_p > 0.0:
        logits = min_p_filter(logits, cfg.min_p, cfg.min_tokens_to_keep)
    return logits


TIE_SLACK = 64  # extra candidates the fast top-k path keeps for logits tied with the k-th


def top_k_top_p_candidates(logits, cfg: SamplerConfig):
    """temperature -> top-k -> top-p on the top_k + TIE_SLACK largest logits only (no sort of the vocabulary).

    Returns vals (B, K) -- the warped logits of the candidates, -inf where a filter removed one --, their token
    ids idx (B, K), and overflow (B,) bool: True where more than TIE_SLACK logits tie with the k-th, the one
    case in which this differs from warp() (which keeps every tied token)."""
    V = logits.shape[-1]
    if cfg.temperature != 1.0:
        logits = temperature(logits, cfg.temperature)
    k = min(max(cfg.top_k, cfg.min_tokens_to_keep), V)
    K = min(k + TIE_SLACK, V)
    # (B, K), descending; on CUDA two Triton kernels (kernels/topk.py: ~10 us where torch.topk takes ~45 in a
    # decode step on an H200), whose ties go to the lower index. Elsewhere torch.topk, called directly: the custom
    # op's dispatch imports torch._dynamo at its first call (1.4 s of a CPU generate.py start that never compiles)
    vals, idx = topk(logits, K) if triton_topk_available(logits.device) else torch.topk(logits, K)
    kth = vals[:, k - 1:k]
    overflow = (vals[:, -1] >= kth[:, 0]) & (K < V)
    vals = vals.masked_fill(vals < kth, NEG_INF)                 # top_k_filter: the k-th and its ties stay
    if cfg.top_p < 1.0:
        # top_p_filter's arithmetic without its sort: topk's values are already in order (flipped: ascending,
        # the removed tokens (-inf) first), which keeps a sort and a scatter off the decode step
        asc = vals.flip(-1)
        cum = asc.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - cfg.top_p)
        remove[..., -cfg.min_tokens_to_keep:] = False
        vals = vals.masked_fill(remove.flip(-1), NEG_INF)
    return vals, idx, overflow


def top_k_candidates_as_logits(logits, cfg: SamplerConfig):
    """top_k_top_p_candidates scattered back to (B, V) (-inf elsewhere): what warp() would return. For tests."""
    vals, idx, overflow = top_k_top_p_candidates(logits, cfg)
    full = torch.full_like(logits, NEG_INF, dtype=vals.dtype)
    return full.scatter(1, idx, vals), overflow


def samples_from_candidates(cfg: SamplerConfig):
    """Whether choose() samples among top_k_top_p_candidates (top-k set, no min-p) rather than the whole vocabulary."""
    return not cfg.greedy and bool(cfg.top_k) and not cfg.min_p


def choose(logits, cfg: SamplerConfig, overflow=None):
    """logits (B, V) already through ContextState.process -> next token ids (B,), on device.

    overflow: an optional (B,) bool buffer, or-ed in place with the fast path's tie overflow."""
    if cfg.greedy:
        return torch.argmax(logits, dim=-1)
    if samples_from_candidates(cfg):
        vals, idx, over = top_k_top_p_candidates(logits, cfg)
        if overflow is not None:
            overflow |= over
        return idx.gather(1, sample_no_sync(torch.softmax(vals, dim=-1))[:, None])[:, 0]
    return sample_no_sync(torch.softmax(warp(logits, cfg), dim=-1))
