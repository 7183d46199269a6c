"""The decoding engine of generate.py: prefill once, then one fixed-shape step per token (gpt-fast's recipe).

    lm = LlamaLM(llama) | CoeusLM(coeus)          # one interface over a KV cache and a recurrent state
    dec = Decoder(lm, SamplerConfig(...)); dec.setup(batch, capacity, device)
    step = make_step(dec, device)                 # torch.compile(mode="reduce-overhead") on CUDA
    for chunk in decode_tokens(dec, step, prompt_ids, max_new_tokens, sync_every=16): ...

Everything `Decoder.decode_one` touches has a fixed shape and address (Llama's static KV cache, Coeus'
state kept in buffers, the sampler's ContextState), so on CUDA the step becomes one CUDA graph; sampling
stays on the device (utils/sampling.py), so the token loop never waits for the host.
`full_recompute_greedy` is the slow reference the tests hold the cached decoding to.
"""
import warnings

import torch
import torch.nn as nn

from models.fused_decode import KINDS as FUSED_KINDS
from models.gemv import use_gemv
from utils.sampling import TIE_SLACK, ContextState, SamplerConfig, choose


# --- model adapters: one interface over a KV-cache decoder and a recurrent one ------------------------------

class LlamaLM(nn.Module):
    """models.llama.Llama behind the decoder interface, with its static KV cache.

    fuse=True concatenates the q/k/v and gate/up weights of the model in place (Llama.fuse_projections):
    fewer kernels per token, same outputs; only for a model that is no longer trained or saved.
    gemv=True sends its one-row matmuls (batch-1 decoding on CUDA) to the Triton kernels of models/gemv.py,
    tuned here for each weight shape (`gemv_report`); with fuse=True too, a decode step's layers run as five
    kernels each (models/fused_decode.py)."""

    def __init__(self, model, fuse=False, gemv=False):
        super().__init__()
        self.model = model.fuse_projections() if fuse else model
        self.gemv_report = use_gemv(self.model, kinds=FUSED_KINDS if fuse else None) if gemv else None
        self.context = model.config.max_seq_len
        self.vocab_size = model.config.vocab_size
        self._shape = None

    def setup(self, batch, capacity):
        if self._shape != (batch, capacity) or self.model.cache_len == 0:  # (cleared from outside)
            self.model.setup_cache(batch, capacity)
            self._shape = (batch, capacity)

    def prefill(self, input_ids, inputs_embeds=None):
        """(B, T) prompt -> logits of its last position (B, V); fills cache slots 0..T-1."""
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        if inputs_embeds is not None:
            return self.model(inputs_embeds=inputs_embeds, input_pos=pos)[:, -1]
        return self.model(input_ids, input_pos=pos)[:, -1]

    def step(self, tok, pos):
        """tok (B,) at absolute position pos (1,) -> logits (B, V)."""
        return self.model(tok[:, None], input_pos=pos)[:, -1]

    def full_logits(self, input_ids):
        return self.model(input_ids)


class CoeusLM(nn.Module):
    """models.coeus.Coeus behind the decoder interface. Its recurrent state lives in buffers of this module,
    updated in place, so the compiled step (a CUDA graph) always reads and writes the same addresses."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.context = None  # no limit: the state is O(1) in the length
        self.vocab_size = model.config.vocab_size
        self._keys, self._batch = (), None

    def setup(self, batch, capacity):
        if self._batch != batch:
            state = self.model.init_state(batch)
            self._keys = tuple(state)
            for k, v in state.items():
                self.register_buffer("state_" + k, v, persistent=False)
            self._batch = batch

    def _state(self):
        return {k: getattr(self, "state_" + k) for k in self._keys}

    def _store(self, new):
        for k in self._keys:
            old = getattr(self, "state_" + k)
            if new[k] is not old:
                old.copy_(new[k])

    def prefill(self, input_ids, inputs_embeds=None):
        fresh = self.model.init_state(input_ids.shape[0])
        logits, state = self.model.prefill(input_ids, fresh, last_only=True)
        self._store(state)
        return logits

    def step(self, tok, pos):
        logits, state = self.model.step(tok, self._state())
        self._store(state)
        return logits

    def full_logits(self, input_ids):
        return self.model(input_ids)


class Decoder(nn.Module):
    """Prefill once, then one token per `decode_one` call. Everything decode_one touches has a fixed shape
    (KV cache or state, ContextState buffers), so it can become one CUDA graph."""

    def __init__(self, lm, sampler: SamplerConfig, n_tokens=None):
        super().__init__()
        self.lm, self.sampler = lm, sampler
        V = lm.vocab_size
        self.ctx = ContextState(sampler, V)
        # rows of a padded embedding that the tokenizer cannot decode are never sampled
        banned = torch.zeros(V, dtype=torch.bool)
        if n_tokens is not None and n_tokens < V:
            banned[n_tokens:] = True
        self.register_buffer("banned", banned, persistent=False)
        # rows where the fast top-k sampler met more ties than it keeps (utils.sampling.TIE_SLACK)
        self.register_buffer("tie_overflow", torch.zeros(0, dtype=torch.bool), persistent=False)
        self.lm_prefill = lm.prefill  # make_step compiles it on CUDA

    def setup(self, batch, capacity, device):
        self.lm.setup(batch, capacity)
        self.ctx.setup(batch, capacity, device)
        self.banned = self.banned.to(device)
        if self.tie_overflow.shape != (batch,) or self.tie_overflow.device != torch.device(device):
            self.tie_overflow = torch.zeros(batch, dtype=torch.bool, device=device)  # zeroed again by prefill

    def _next(self, logits, cur_len):
        logits = logits.float().masked_fill(self.banned, -float("inf"))
        logits = self.ctx.process(logits, cur_len)
        return choose(logits, self.sampler, overflow=self.tie_overflow)

    def prefill(self, prompt_ids, inputs_embeds=None):
        """prompt (B, T) -> first new token (B,), written at position T."""
        T = prompt_ids.shape[1]
        self.ctx.reset(prompt_ids)
        self.tie_overflow.zero_()
        logits = self.lm_prefill(prompt_ids, inputs_embeds)
        pos = torch.tensor([T], device=prompt_ids.device)
        tok = self._next(logits, pos)
        self.ctx.append(tok, pos)
        return tok

    def decode_one(self, tok, pos):
        """tok (B,) sits at position pos (1,): run it, return the token for position pos + 1."""
        logits = self.lm.step(tok, pos)
        cur = pos + 1
        nxt = self._next(logits, cur)
        self.ctx.append(nxt, cur)
        return nxt


def warn_on_tie_overflow(decoder):
    """After decoding: say so if the fast top-k sampler ever met more ties with the k-th logit than it keeps."""
    if decoder.tie_overflow.numel() and bool(decoder.tie_overflow.any()):
        warnings.warn(f"more than {TIE_SLACK} logits tied with the top-k cut-off at some step: the sampler "
                      f"drew among top_k + {TIE_SLACK} of them, where transformers' TopKLogitsWarper keeps them all")
        return True
    return False


def make_step(decoder, device, compile_mode="auto", tune=False):
    """decode_one, compiled (CUDA: reduce-overhead = CUDA graphs; CPU: eager unless asked) with an eager
    fallback when the compiler fails; on CUDA the decoder's prefill forward is compiled too (dynamic shapes,
    no CUDA graphs). tune: gpt-fast's inductor settings (coordinate descent tuning of the kernels: faster
    steps, much longer compilation)."""
    use = compile_mode == "on" or (compile_mode == "auto" and device.startswith("cuda"))
    if not use:
        return decoder.decode_one
    cuda = device.startswith("cuda")
    if cuda:
        import torch._inductor.config as ic
        ic.triton.unique_kernel_names = True
        ic.fx_graph_cache = True
        if tune:
            ic.coordinate_descent_tuning = True
    step_fn = CompiledOrEager(decoder.decode_one, "the decode step", mode="reduce-overhead" if cuda else None,
                              fullgraph=True)
    if cuda:  # the prompt's forward too: eager it is hundreds of launches from Python (~17 ms for TinyLlama)
        decoder.lm_prefill = CompiledOrEager(decoder.lm.prefill, "the prefill", dynamic=True)

    def step(tok, pos):
        if cuda and step_fn.is_compiled():
            torch.compiler.cudagraph_mark_step_begin()
        return step_fn(tok, pos).clone()  # a CUDA graph overwrites its output on the next replay
    step.is_compiled = step_fn.is_compiled
    return step


class CompiledOrEager:
    """torch.compile(fn, **kw) that falls back to fn, with a warning, for good once compiling it fails."""

    def __init__(self, fn, what, **compile_kw):
        self.eager, self.what = fn, what
        self.compiled = self.fn = torch.compile(fn, **compile_kw)

    def is_compiled(self):
        return self.fn is self.compiled

    def __call__(self, *args):
        if self.fn is self.eager:
            return self.eager(*args)
        try:
            return self.fn(*args)
        except Exception as e:  # pragma: no cover - depends on the machine's compiler
            warnings.warn(f"torch.compile of {self.what} failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); running it eagerly")
            self.fn = self.eager
            return self.eager(*args)


@torch.no_grad()
def decode_tokens(decoder, step, prompt_ids, max_new_tokens, sync_every=16, inputs_embeds=None):
    """Generator of new-token chunks: yields (B, n) LongTensors (on device) every sync_every tokens and at
    the end; the caller may stop early. sync_every=0 yields once, at the end (no sync inside the loop)."""
    B, T = prompt_ids.shape
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=prompt_ids.device)
    tok = decoder.prefill(prompt_ids, inputs_embeds)
    out[:, 0] = tok
    pos = torch.tensor([T], device=prompt_ids.device)
    start = 0
    for i in range(1, max_new_tokens):
        tok = step(tok, pos)
        out[:, i] = tok
        pos += 1
        if sync_every and (i + 1) % sync_every == 0:
            yield out[:, start:i + 1]
            start = i + 1
    if start < max_new_tokens:
        yield out[:, start:]


def full_recompute_greedy(lm, prompt_ids, max_new_tokens):
    """Slow reference: rerun the whole sequence for every token, argmax (what the decoder must equal)."""
    ids = prompt_ids
    for _ in range(max_new_tokens):
        nxt = lm.full_logits(ids)[:, -1].float().argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids[:, prompt_ids.shape[1]:]
