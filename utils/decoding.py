"""The decoding engine of generate.py: prefill once, then one fixed-shape step per token (gpt-fast's recipe).

    lm = LlamaLM(llama) | CoeusLM(coeus)          # one interface over a KV cache and a recurrent state
    lm = inference_lm(lm, device)                 # fused projections; on CUDA the kernels/ path, tuned here
    dec = Decoder(lm, SamplerConfig(...)); dec.setup(batch, capacity, device)
    step = make_step(dec, device)                 # on CUDA a CUDA graph of the step (compiled or as it runs)
    for chunk in decode_tokens(dec, step, prompt_ids, max_new_tokens, sync_every=16): ...
    Session(loaded, sampler, device).generate(ids, ...)   # all of that for one prompt after another, as text

Everything `Decoder.decode_one` touches has a fixed shape and address (Llama's static KV cache, Coeus'
state kept in buffers, the sampler's ContextState), so on CUDA the step becomes one CUDA graph; sampling
stays on the device (utils/sampling.py), so the token loop never waits for the host.
`full_recompute_greedy` is the slow reference the tests hold the cached decoding to; `greedy_generate` is
the plain batched, left-padded greedy decoder of train_vqa.py's evaluation.
"""
import sys
import time
import warnings

import torch
import torch.nn as nn

from kernels.fused_decode import (KINDS as FUSED_KINDS, can_run_fused_layers, fused_layers,
                                  fused_layers_unsupported, new_arrivals, precompile_fused_layers)
from kernels.gemv import use_gemv
from kernels.launch import compile_in_parallel, kernels_by_default
from utils.runtime import CompiledOrEager, GraphedCalls
from utils.sampling import (TIE_SLACK, ContextState, SamplerConfig, choose, samples_from_candidates,
                            top_k_top_p_candidates)


# --- model adapters: one interface over a KV-cache decoder and a recurrent one ------------------------------

class LlamaLM(nn.Module):
    """models.llama.Llama behind the decoder interface, with its static KV cache.

    fuse=True concatenates the q/k/v and gate/up weights of the model in place (Llama.fuse_projections):
    fewer kernels per token, same outputs; only for a model that is no longer trained or saved.
    gemv=True sends its one-row matmuls (batch-1 decoding on CUDA) to the Triton kernels of kernels/gemv.py,
    tuned here for each weight shape (`gemv_report`); with fuse=True too, a batch-1 step's layers run as five
    kernels each (kernels/fused_decode.py) instead of the model's Blocks."""

    def __init__(self, model, fuse=False, gemv=False):
        super().__init__()
        self.model = model.fuse_projections() if fuse else model
        self.gemv_report = use_gemv(self.model, kinds=FUSED_KINDS if fuse else None) if gemv else None
        # the fused layers need q/k/v and gate/up fused and every projection a DecodeLinear of its kind
        self.layer_kernels = fuse and self.gemv_report is not None
        # ... and no bias but on q/k/v (Qwen2's, added by the attention kernel): a model with an o_proj or MLP bias
        # decodes through its own (compiled) Blocks instead
        self.layer_kernels_off = fused_layers_unsupported(self.model.layers) if self.layer_kernels else None
        if self.layer_kernels_off:
            warnings.warn(f"fused decode layers off: {self.layer_kernels_off}; decoding runs the model's layers")
            self.layer_kernels = False
        # their attention kernel's arrival counters, allocated with the KV cache; a buffer, so that a CUDA graph
        # of the step finds them at one address
        self.register_buffer("arrivals", None, persistent=False)
        self.context = model.config.max_seq_len
        self.vocab_size = model.config.vocab_size
        self._shape = None

    def setup(self, batch, capacity):
        if self._shape != (batch, capacity) or self.model.cache_len == 0:  # (cleared from outside)
            self.model.setup_cache(batch, capacity)
            if self.layer_kernels:
                self.arrivals = new_arrivals(self.model.layers)
                self._precompile_step()
            self._shape = (batch, capacity)

    @torch.no_grad()
    def _precompile_step(self):
        """On CUDA, compile the kernels of a one-token step through the fused layers, all at once on a pool of
        threads, before the first step would compile them one after another (a cold start's first tokens)."""
        if not self.arrivals.is_cuda:
            return
        pos = torch.zeros(1, dtype=torch.long, device=self.arrivals.device)
        x, cos, sin, mask = self.model.layer_inputs(torch.zeros(1, 1, dtype=torch.long, device=pos.device), None,
                                                    input_pos=pos)
        if can_run_fused_layers(self.model.layers, x, pos):
            precompile_fused_layers(self.model.layers, x, cos, sin, mask, pos, self.arrivals, head=self.model.lm_head)

    def prefill(self, input_ids, inputs_embeds=None):
        """(B, T) prompt -> logits of its last position (B, V); fills cache slots 0..T-1."""
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        return self._last_logits(input_ids, inputs_embeds, pos)

    def step(self, tok, pos):
        """tok (B,) at absolute position pos (1,) -> logits (B, V)."""
        return self._last_logits(tok[:, None], None, pos)

    def compile_glue(self):
        """torch.compile the small work around the fused layers (embedding, RoPE, mask; the final norm and head):
        what a CUDA graph of the eager step would otherwise run as a dozen tiny kernels (make_step's "graph")."""
        self._inputs = CompiledOrEager(self.model.layer_inputs, "the decode step's inputs", fullgraph=True)
        self._head = CompiledOrEager(self._head_eager, "the decode step's head", fullgraph=True)

    def _inputs(self, input_ids, inputs_embeds=None, input_pos=None):
        return self.model.layer_inputs(input_ids, inputs_embeds, input_pos=input_pos)

    def _head_eager(self, h):
        return self.model.lm_head(self.model.norm(h))[:, -1]

    _head = _head_eager

    def _last_logits(self, input_ids, inputs_embeds, pos):
        """Logits (B, V) of the last of these tokens, which go into the cache at pos: a batch-1 one-token call
        through the fused layers where they can run (half precision, kernels ready on this device)."""
        if self.arrivals is not None and not torch.is_grad_enabled() and input_ids.shape[1] == 1:
            x, cos, sin, mask = self._inputs(input_ids, inputs_embeds, input_pos=pos)
            if can_run_fused_layers(self.model.layers, x, pos):
                h = fused_layers(self.model.layers, x, cos, sin, mask, pos, self.arrivals)  # (1, 1, dim)
                return self._head(h)
        # the head on the last position only: a prompt's (B, T, V) logits were 2 GB at Llama-3's 128k vocabulary and
        # 8k tokens (and a prefill's CUDA graph keeps its peak)
        h = self.model.hidden(None if inputs_embeds is not None else input_ids, inputs_embeds, input_pos=pos)
        return self.model.lm_head(h[:, -1])

    def full_logits(self, input_ids):
        return self.model(input_ids)


def inference_lm(lm, device):
    """The adapter to decode with on device: a LlamaLM's model gets fused projections (it is then no longer
    trained or saved) and, on CUDA with Triton, its batch-1 steps go through kernels/, tuned now for each
    weight shape; a CoeusLM stays as it is."""
    if isinstance(lm, LlamaLM):
        return LlamaLM(lm.model, fuse=True, gemv=kernels_by_default(device))
    return lm


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
        self.lm_prefill = lm.prefill  # make_step compiles it or replays it from CUDA graphs on CUDA
        self.graphed = []  # make_step's GraphedCalls: their graphs hold the buffers' addresses

    def setup(self, batch, capacity, device):
        for g in self.graphed:  # the cache and buffers may be reallocated: graphs captured on them are stale
            g.reset()
        self.lm.setup(batch, capacity)
        self.ctx.setup(batch, capacity, device)
        self.banned = self.banned.to(device)
        if str(device).startswith("cuda") and samples_from_candidates(self.sampler):
            # the top-k kernels compiled now, beside nothing else, rather than inside the first step (no launch runs)
            with compile_in_parallel():
                top_k_top_p_candidates(torch.zeros(batch, self.lm.vocab_size, device=device), self.sampler)
        if self.tie_overflow.shape != (batch,) or self.tie_overflow.device != torch.device(device):
            self.tie_overflow = torch.zeros(batch, dtype=torch.bool, device=device)  # zeroed again by prefill

    def _next(self, logits, cur_len):
        logits = logits.float().masked_fill(self.banned, -float("inf"))
        logits = self.ctx.process(logits, cur_len)
        return choose(logits, self.sampler, overflow=self.tie_overflow)

    def _sample_eager(self, logits, cur):
        """The token at position cur from the logits before it, recorded in the context state."""
        nxt = self._next(logits, cur)
        self.ctx.append(nxt, cur)
        return nxt

    _sample = _sample_eager

    def compile_glue(self):
        """torch.compile the sampler and the model's small work around its kernels (make_step's "graph")."""
        self._sample = CompiledOrEager(self._sample_eager, "the sampler", fullgraph=True)
        if hasattr(self.lm, "compile_glue"):
            self.lm.compile_glue()

    def prefill(self, prompt_ids, inputs_embeds=None):
        """prompt (B, T) -> first new token (B,), written at position T."""
        T = prompt_ids.shape[1]
        self.ctx.reset(prompt_ids)
        self.tie_overflow.zero_()
        logits = self.lm_prefill(prompt_ids, inputs_embeds)
        return self._sample(logits, torch.tensor([T], device=prompt_ids.device))

    def decode_one(self, tok, pos):
        """tok (B,) sits at position pos (1,): run it, return the token for position pos + 1."""
        logits = self.lm.step(tok, pos)
        return self._sample(logits, pos + 1)


def warn_on_tie_overflow(decoder):
    """After decoding: say so if the fast top-k sampler ever met more ties with the k-th logit than it keeps."""
    if decoder.tie_overflow.numel() and bool(decoder.tie_overflow.any()):
        warnings.warn(f"more than {TIE_SLACK} logits tied with the top-k cut-off at some step: the sampler "
                      f"drew among top_k + {TIE_SLACK} of them, where transformers' TopKLogitsWarper keeps them all")
        return True
    return False


STEP_MODES = ("auto", "on", "graph", "off")
PREFILL_GRAPH_TOKENS = 2048  # make_step's prefill graphs: prompts (batch x length) of up to this many tokens
PREFILL_MODES = ("auto", "graph", "compile", "eager")


def step_mode(decoder, device, compile_mode="auto", batch=1):
    """What make_step does for compile_mode on device: "auto" is "graph" where the model's layers run as the fused
    kernels (LlamaLM at batch 1 on CUDA: little is left for a compiler to fuse), else "on" on CUDA, "off" on CPU."""
    if compile_mode != "auto":
        return compile_mode
    if not device.startswith("cuda"):
        return "off"
    return "graph" if batch == 1 and getattr(decoder.lm, "layer_kernels", False) else "on"


def make_step(decoder, device, compile_mode="auto", tune=False, prefill="auto", batch=1):
    """decode_one made fast for device, and the decoder's prefill with it. compile_mode (step_mode for "auto", for
    the batch the decoder will be set up with):
      on     torch.compile(mode="reduce-overhead"): inductor fuses the step and replays it as a CUDA graph
             (gpt-fast's recipe); tune: gpt-fast's coordinate-descent tuning of its kernels (much longer compilation)
      graph  the step captured as a CUDA graph as it runs eagerly (utils.runtime.GraphedCalls), its small glue
             (embedding, RoPE, mask, final norm, sampler) compiled as three small graphs: seconds of compilation
             where "on" takes a minute, for a step that is mostly hand-written kernels anyway
      off    eager
    prefill ("auto": "graph" on CUDA when the step is not "off", else "eager"): "graph" replays the prompt's forward
    from a CUDA graph per prompt shape of up to PREFILL_GRAPH_TOKENS tokens (a shape's first prefill runs eagerly, its
    second is captured); "compile" compiles it with dynamic shapes (tens of seconds before the first token). A
    compiler failure falls back to eager, with a warning."""
    cuda = device.startswith("cuda")
    mode = step_mode(decoder, device, compile_mode, batch)
    if prefill == "auto":
        prefill = "graph" if cuda and mode != "off" else "eager"
    if mode != "off" and cuda:
        import torch._inductor.config as ic
        ic.triton.unique_kernel_names = True
        ic.fx_graph_cache = True
        if tune and mode == "on":
            ic.coordinate_descent_tuning = True
    if prefill == "graph":  # the prompt's forward: eager it is hundreds of launches from Python (~17 ms for TinyLlama)
        # up to PREFILL_GRAPH_TOKENS: a longer prompt's forward is compute-bound, and its graph would keep the memory
        # of its activations
        decoder.lm_prefill = GraphedCalls(decoder.lm.prefill, "the prefill",
                                          capture_if=lambda ids, embeds=None: ids.numel() <= PREFILL_GRAPH_TOKENS)
        decoder.graphed.append(decoder.lm_prefill)
    elif prefill == "compile":
        decoder.lm_prefill = CompiledOrEager(decoder.lm.prefill, "the prefill", dynamic=True)
    if mode == "off":
        def step(tok, pos):
            return decoder.decode_one(tok, pos)
        step.is_compiled = lambda: False
        step.mode, step.prefill = "off", prefill
        return step
    if mode == "graph":
        decoder.compile_glue()
        step_fn = GraphedCalls(decoder.decode_one, "the decode step")
        decoder.graphed.append(step_fn)

        def step(tok, pos):
            return step_fn(tok, pos)  # a copy of the graph's output
        step.is_compiled = lambda: step_fn.captured() > 0
        step.mode, step.prefill = "graph", prefill
        return step
    step_fn = CompiledOrEager(decoder.decode_one, "the decode step", mode="reduce-overhead" if cuda else None,
                              fullgraph=True)

    def step(tok, pos):
        if cuda and step_fn.is_compiled():
            torch.compiler.cudagraph_mark_step_begin()
        return step_fn(tok, pos).clone()  # a CUDA graph overwrites its output on the next replay
    step.is_compiled = step_fn.is_compiled
    step.mode, step.prefill = "on", prefill
    return step


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


# --- text in, text out: one prompt after another ------------------------------------------------------------

class Session:
    """A loaded model (utils/load_model.py's Loaded) with its decoder and compiled step, reused across prompts
    (generate.py's interactive mode): cache and buffers keep one size while prompts fit, so the step is compiled
    once."""

    def __init__(self, loaded, sampler, device, compile_mode="auto", prefill="auto", batch=1):
        self.loaded, self.device, self.sampler = loaded, device, sampler
        self.decoder = Decoder(loaded.lm, sampler, loaded.extras.get("n_tokens")).to(device)
        self.step = make_step(self.decoder, device, compile_mode, prefill=prefill, batch=batch)
        self.capacity, self.batch = 0, None

    def _setup(self, batch, need):
        # one size for every prompt that fits, so the compiled step is compiled once: the whole context for
        # Llama (masked slots cost little next to the weights), multiples of 1024 for Coeus' token buffer
        context = self.loaded.lm.context
        cap = context if context else max(self.capacity, -(-need // 1024) * 1024)
        if cap != self.capacity or batch != self.batch:
            self.decoder.setup(batch, cap, self.device)
            self.capacity, self.batch = cap, batch

    @torch.no_grad()
    def generate(self, ids, num_samples=1, max_new_tokens=200, pixels=None, stop=(), sync_every=16,
                 on_text=None, ignore_eos=False):
        """ids: one prompt (list of ints), decoded num_samples times as one batch; pixels: its images in the order
        of their placeholder runs (n_images, 3, H, W), or None. Returns dict(texts,
        token_ids (per sample, up to EOS), new_tokens (kept, all samples), steps, prefill_and_first_chunk_s,
        total_s, first_chunk_clock: time.perf_counter() when the first tokens reached the host). on_text(str)
        receives sample 0's text as it grows (streaming)."""
        tok, dev = self.loaded.tokenizer, self.device
        prompt = torch.tensor([ids], dtype=torch.long, device=dev).expand(num_samples, -1).contiguous()
        self._setup(num_samples, len(ids) + max_new_tokens)
        embeds = None
        if pixels is not None:  # pixels: the prompt's images (n_images, 3, H, W), embedded once for every sample
            embeds = self.loaded.llava.embed(prompt[:1], pixels.to(dev)).expand(num_samples, -1, -1).contiguous()
        template = (self.loaded.extras or {}).get("template")
        # a chat answer ends with the template's end of turn (<|eot_id|>, <|im_end|>; the eos in the LLaVA layout)
        eos = None if ignore_eos else (template.end_of_turn_id(tok) if template is not None else tok.eos_id)
        rows = [Row(tok, ids, eos, stop) for _ in range(num_samples)]
        t0 = time.perf_counter()
        t_first = None
        for chunk in decode_tokens(self.decoder, self.step, prompt, max_new_tokens, sync_every, embeds):
            chunk = chunk.tolist()  # the one host sync per chunk
            if t_first is None:
                t_first = time.perf_counter()
            for row, new in zip(rows, chunk):
                row.add(new)
            if on_text is not None:
                on_text(rows[0].stream_text())
            if all(r.done for r in rows):
                break
        if str(dev).startswith("cuda"):
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        warn_on_tie_overflow(self.decoder)
        if on_text is not None:
            on_text(rows[0].text())
        return dict(texts=[r.text() for r in rows], token_ids=[r.ids for r in rows],
                    new_tokens=sum(len(r.ids) for r in rows), steps=max(r.steps for r in rows),
                    prefill_and_first_chunk_s=t_first - t0, total_s=t1 - t0, first_chunk_clock=t_first)


class Row:
    """One sample on the host: its new tokens up to EOS, its text up to the first stop string."""

    def __init__(self, tok, prompt_ids, eos, stop):
        self.tok, self.eos, self.stop = tok, eos, [s for s in stop if s]
        # decode with a little of the prompt in front so sentencepiece keeps the first word's space
        self.prefix = [i for i in prompt_ids[-8:] if 0 <= i < tok.vocab_size]
        self.prefix_text = tok.decode(self.prefix)
        self.ids, self.done, self.steps, self._text = [], False, 0, ""

    def add(self, new):
        self.steps += len(new)
        if self.done:
            return
        if self.eos is not None and self.eos in new:
            new, self.done = new[:new.index(self.eos)], True
        self.ids += new
        text = self.tok.decode(self.prefix + self.ids)
        text = text[len(self.prefix_text):] if text.startswith(self.prefix_text) else self.tok.decode(self.ids)
        cut = [text.find(s) for s in self.stop if s in text]
        if cut:
            text, self.done = text[:min(cut)], True
        self._text = text

    def stream_text(self):
        """What is safe to show now: hold back a possible stop-string start and a half-decoded character."""
        if self.done:
            return self._text
        hold = max((len(s) - 1 for s in self.stop), default=0)
        text = self._text[:len(self._text) - hold] if hold else self._text
        return text.rstrip("\ufffd")

    def text(self):
        return self._text


class Streamer:
    """Prints the growing text of sample 0 (only what is new since the last call)."""

    def __init__(self, out=None):
        self.out, self.shown = out, ""

    def __call__(self, text):
        if text.startswith(self.shown):
            out = self.out or sys.stdout
            out.write(text[len(self.shown):])
            out.flush()
            self.shown = text


# --- batched greedy decoding without the engine: train_vqa.py's evaluation ----------------------------------

@torch.no_grad()
def greedy_generate(model, prompts, pixel_values, eos_id, pad_id, max_new_tokens, autocast):
    """Batched greedy decoding with the decoder's static KV cache (train_vqa.py's evaluation).

    model: a models.llava.LlavaModel, or a plain models.llama.Llama (then pixel_values is None).
    prompts: list of id lists (left-padded here); pixel_values: their images in order.
    The prompt (with image features) is prefilled once; each new token is one cached decode step.
    Returns a list of generated id lists (without the prompt, cut at eos).
    """
    lm = getattr(model, "language_model", model)
    device = lm.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + max_new_tokens), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask[:, :P].cumsum(1) - 1).clamp(min=0)  # (B, P) RoPE positions ignore the left padding
    lengths = mask[:, :P].sum(1)
    lm.setup_cache(B, P + max_new_tokens)
    try:
        with autocast:
            if hasattr(model, "embed"):
                emb = model.embed(ids, None if pixel_values is None else pixel_values.to(device))
            else:
                emb = lm.embed_tokens(ids)
            logits = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                        input_pos=torch.arange(P, device=device))
        out = torch.empty((B, 0), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == eos_id
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            with autocast:
                logits = lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=(lengths + i)[:, None],
                            input_pos=torch.tensor([P + i], device=device))
    finally:
        lm.clear_cache()
    result = []
    for row in out.tolist():
        result.append(row[:row.index(eos_id)] if eos_id in row else row)
    return result
