"""Language-model quality metrics: perplexity and degeneration (repetition / diversity) of continuations.

Degeneration metrics take sequences of units (token ids, or words of the decoded text) and follow
Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training", §5, and Li et al. 2016:

    seq-rep-n   per continuation, 1 - |unique n-grams| / |n-grams|, averaged over continuations
                (seq-rep-4 is Welleck's headline number; SimCTG calls the same quantity rep-n)
    rep/l       per continuation, the share of units that already occurred among the l units before them
                (Welleck's token-level `rep/l`), averaged over continuations
    distinct-n  |unique n-grams| / |n-grams| pooled over all continuations (Li et al. 2016)

Each is a fraction in [0, 1]; a continuation too short to hold one n-gram is left out of seq-rep-n.
"""
import math

import torch
import torch.nn.functional as F


def ngrams(seq, n):
    return list(zip(*(seq[i:] for i in range(n))))


def seq_rep_n(seqs, n=4):
    vals = []
    for s in seqs:
        grams = ngrams(list(s), n)
        if grams:
            vals.append(1.0 - len(set(grams)) / len(grams))
    return sum(vals) / len(vals) if vals else float("nan")


def rep_l(seqs, l=16):
    vals = []
    for s in seqs:
        s = list(s)
        if len(s) < 2:
            continue
        hits = sum(s[t] in s[max(0, t - l):t] for t in range(1, len(s)))
        vals.append(hits / (len(s) - 1))
    return sum(vals) / len(vals) if vals else float("nan")


def distinct_n(seqs, n):
    grams = [g for s in seqs for g in ngrams(list(s), n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def degeneration_metrics(seqs, rep_windows=(16, 32, 128)):
    """All the above for a list of unit sequences -> flat dict (fractions)."""
    out = {f"seq_rep_{n}": seq_rep_n(seqs, n) for n in (2, 3, 4)}
    out.update({f"rep_{l}": rep_l(seqs, l) for l in rep_windows})
    out.update({f"distinct_{n}": distinct_n(seqs, n) for n in (1, 2, 3)})
    out["mean_length"] = sum(len(s) for s in seqs) / max(len(seqs), 1)
    return out


def words(text):
    return text.split()


@torch.no_grad()
def perplexity(logits_fn, ids, block_size, batch_size=8, device="cpu", max_tokens=None):
    """Perplexity of a token stream cut into non-overlapping blocks of block_size tokens.

    logits_fn(input_ids (B, T)) -> logits (B, T, V). Each block predicts its tokens 2..T from the ones
    before it inside the block (the way training loss is computed). Returns dict(loss, ppl, tokens) with
    loss in nats per predicted token.
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    if max_tokens:
        ids = ids[:max_tokens]
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise ValueError(f"evaluation text has {len(ids)} tokens, fewer than one block of {block_size}")
    blocks = ids[:n_blocks * block_size].view(n_blocks, block_size)
    total, count = 0.0, 0
    for i in range(0, n_blocks, batch_size):
        x = blocks[i:i + batch_size].to(device)
        logits = logits_fn(x)[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    loss = total / count
    return dict(loss=loss, ppl=math.exp(loss), tokens=count)
