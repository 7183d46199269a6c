"""Sample from any checkpoint this project writes, fast and exactly as transformers' samplers do.

    python generate.py --ckpt checkpoints/coeus/best.pt --prompt "ROMEO:"          # stream one sample
    python generate.py --ckpt ckpt.pt --prompt "ROMEO:" --num-samples 4 --seed 1   # 4 samples as one batch
    python generate.py --ckpt ckpt.pt --temperature 0                               # greedy
    python generate.py --ckpt ckpt.pt --interactive                                 # one prompt per stdin line
    python generate.py --ckpt vqa.pt --image cat.jpg --prompt "What is in the picture?"
    python generate.py --ckpt path/to/TinyLlama-folder --prompt "Once upon a time"  # HF LlamaForCausalLM folder
    python generate.py --ckpt ckpt.pt --eval --eval-file data/valid.txt             # perplexity + degeneration

Checkpoint kinds: "llama" and "coeus" (train_coeus.py), "vqa" (train_vqa.py), "detect" (train_detect.py,
its LLaVA side), and Hugging Face folders (LlamaForCausalLM / LlavaForConditionalGeneration) read through
models/hf_weights.py.

How it is fast (gpt-fast's recipe, in utils/decoding.py): the prompt runs once (prefill) into a static KV
cache (Llama) or the recurrent state (Coeus); then each token is one call of a fixed-shape decode step,
compiled on CUDA with mode="reduce-overhead" (a CUDA graph). Penalties and filters work on preallocated
buffers and sampling happens on the device (utils/sampling.py), so the token loop never waits for the host;
the host reads the tokens once every --sync-every tokens to stream text and check EOS / stop strings.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from models.gemv import kernels_by_default
from utils.checkpoint import load_checkpoint
from utils.decoding import CoeusLM, Decoder, LlamaLM, decode_tokens, make_step, warn_on_tie_overflow
from utils.lm_metrics import degeneration_metrics, perplexity, words
from utils.runtime import pick_device, seed_everything
from utils.sampling import SamplerConfig

KINDS = ("llama", "coeus", "vqa", "detect")


# --- loading -------------------------------------------------------------------------------------------

@dataclass
class Loaded:
    kind: str
    lm: nn.Module                   # LlamaLM or CoeusLM
    tokenizer: object
    llava: nn.Module = None         # the LlavaModel for VQA / detection checkpoints
    extras: dict = field(default_factory=dict)  # image processor, chat template, image token id


def _fail(msg):
    raise SystemExit(f"error: {msg}")


def load_model(path, device="cpu", dtype=torch.float32, tokenizer_path=None):
    """A checkpoint file of this project or an HF folder -> Loaded. Bad input ends in one clear line."""
    from utils.tokenizer import SentencePieceTokenizer, tokenizer_from_dict
    if os.path.isdir(path):
        return _load_hf_folder(path, device, dtype, tokenizer_path)
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    kind, mc = ckpt["kind"], ckpt.get("model_config")
    if kind not in KINDS:
        _fail(f"{path} holds a model of kind {kind!r}; generate.py reads {', '.join(KINDS)} checkpoints "
              "or a Hugging Face folder")
    llava, extras = None, {}
    try:
        if kind == "llama":
            from models.llama import Llama, LlamaConfig
            model = Llama(LlamaConfig(**mc))
            model.load_state_dict(ckpt["model"])
        elif kind == "coeus":
            from models.coeus import Coeus, CoeusConfig
            model = Coeus(CoeusConfig(**mc))
            model.load_state_dict(ckpt["model"])
        else:
            from models.llava import LlavaConfig, LlavaModel
            if kind == "detect":  # the detection model wraps a LlavaModel as `llava.`
                mc = mc["llava"]
                state = {k[len("llava."):]: v for k, v in ckpt["model"].items() if k.startswith("llava.")}
            else:
                state = ckpt["model"]
            llava = LlavaModel(LlavaConfig.from_dict(mc))
            llava.load_state_dict(state)
            model = llava.language_model
            extras = _vqa_extras(ckpt, llava)
    except (TypeError, KeyError, RuntimeError) as e:
        _fail(f"{path}: the '{kind}' checkpoint does not fit its model ({type(e).__name__}: "
              f"{str(e).splitlines()[0]})")
    if tokenizer_path:
        tok = SentencePieceTokenizer.from_file(tokenizer_path)
    elif "tokenizer" in ckpt:
        tok = tokenizer_from_dict(ckpt["tokenizer"])
    else:
        _fail(f"{path} carries no tokenizer; pass --tokenizer PATH (a sentencepiece .model)")
    return _finish(kind, model, tok, llava, extras, device, dtype, path)


def _vqa_extras(ckpt, llava):
    from utils.chat import ChatTemplate
    from utils.image_processing import ImageProcessor
    extras = {"image_token_id": ckpt.get("special_tokens", {}).get("image", llava.config.image_token_id),
              "template": ChatTemplate(**ckpt["template"]) if "template" in ckpt else ChatTemplate()}
    size = llava.config.vision.image_size if hasattr(llava.config.vision, "image_size") else 336
    extras["processor"] = (ImageProcessor.from_dict(ckpt["image_processor"]) if "image_processor" in ckpt
                           else ImageProcessor(size))
    return extras


def _load_hf_folder(path, device, dtype, tokenizer_path):
    from models.hf_weights import load_pretrained, read_config, detect_family, tokenizer_model_path
    from utils.tokenizer import SentencePieceTokenizer
    try:
        family = detect_family(read_config(path))
        if family not in ("llama", "llava"):
            _fail(f"{path} is a {family!r} model; generate.py reads LlamaForCausalLM and LLaVA folders")
        model = load_pretrained(path, dtype=torch.float32, device="cpu")
    except (FileNotFoundError, ValueError, KeyError) as e:
        _fail(f"{path}: {e}")
    tok_path = tokenizer_path or tokenizer_model_path(path)
    if tok_path is None:
        _fail(f"{path} has no tokenizer.model; pass --tokenizer PATH (a sentencepiece .model)")
    tok = SentencePieceTokenizer.from_file(tok_path)
    if family == "llava":
        from utils.chat import ChatTemplate
        from utils.image_processing import ImageProcessor
        extras = {"image_token_id": model.config.image_token_id, "template": ChatTemplate(),
                  "processor": ImageProcessor(model.config.vision.image_size)}
        return _finish("vqa", model.language_model, tok, model, extras, device, dtype, path)
    return _finish("llama", model, tok, None, {}, device, dtype, path)


def check_vocab(tok, model_vocab, image_token_id=None, source=""):
    """The tokenizer must index the model's rows: at most the model's vocabulary (an image placeholder past
    it excepted), and the model at most padded up to a multiple of 128 beyond it."""
    n = tok.vocab_size
    if image_token_id is not None and image_token_id >= model_vocab and image_token_id == n - 1:
        n -= 1  # the <image> placeholder is never embedded (see models/llava.py)
    padded = -(-n // 128) * 128
    if n > model_vocab or model_vocab > padded:
        _fail(f"{source}: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {model_vocab} "
              "(a tokenizer of another model?)")
    return n


def _finish(kind, model, tok, llava, extras, device, dtype, source):
    is_coeus = type(model).__name__ == "Coeus"
    n = check_vocab(tok, model.config.vocab_size, extras.get("image_token_id"), source)
    extras["n_tokens"] = n
    target = llava if llava is not None else model
    target.to(device=device, dtype=dtype).eval()
    # generate never trains or saves: fused projections; batch-1 steps on CUDA through models/gemv.py's kernels
    lm = CoeusLM(model) if is_coeus else LlamaLM(model, fuse=True, gemv=kernels_by_default(device))
    return Loaded(kind, lm, tok, llava, extras)


# --- prompts -------------------------------------------------------------------------------------------

def encode_prompt(loaded, text, image=None):
    """-> (ids: list[int], pixel_values (1, 3, H, W) or None)."""
    tok = loaded.tokenizer
    if loaded.llava is None:
        if image is not None:
            _fail("--image needs a VQA (or detection) checkpoint")
        try:
            ids = tok.encode(text)
        except ValueError as e:
            _fail(f"cannot encode the prompt: {e}")
        if tok.bos_id is not None:
            ids = [tok.bos_id] + ids
        if not ids:
            _fail("the prompt is empty and the tokenizer has no BOS token to start from; give --prompt")
        return ids, None
    from utils.chat import IMAGE_TAG, encode_conversation
    ex = loaded.extras
    pixels = None
    if image is not None:
        from PIL import Image, UnidentifiedImageError
        try:
            img = Image.open(image)
            img.load()
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            _fail(f"cannot read image {image}: {e}")
        pixels = ex["processor"](img)[None]
        if IMAGE_TAG not in text:
            text = IMAGE_TAG + "\n" + text
    elif IMAGE_TAG in text:
        _fail(f"the prompt holds {IMAGE_TAG} but no --image was given")
    try:
        enc = encode_conversation([{"from": "human", "value": text}], tok, ex["image_token_id"],
                                  loaded.llava.num_image_tokens, max_len=10 ** 9, template=ex["template"])
    except ValueError as e:
        _fail(f"cannot encode the prompt: {e}")
    return enc["input_ids"], pixels


def fit_context(ids, max_new_tokens, context, truncate_left, has_image=False):
    """A Llama context holds prompt + new tokens; too long is an error naming the limit, or a left cut."""
    if context is None or len(ids) + max_new_tokens <= context:
        return ids
    if max_new_tokens >= context:
        _fail(f"--max-new-tokens {max_new_tokens} does not fit the model's context of {context} tokens")
    if not truncate_left or has_image:
        _fail(f"the prompt is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that is "
              f"{len(ids) + max_new_tokens}, over the model's context of {context} tokens "
              f"(shorten it, lower --max-new-tokens{'' if has_image else ', or pass --truncate-left'})")
    return ids[len(ids) + max_new_tokens - context:]


# --- running one prompt --------------------------------------------------------------------------------

class Session:
    """A loaded model with its decoder and compiled step, reused across prompts (interactive mode): cache and
    buffers keep one size while prompts fit, so the step is compiled once."""

    def __init__(self, loaded, sampler, device, compile_mode="auto"):
        self.loaded, self.device, self.sampler = loaded, device, sampler
        self.decoder = Decoder(loaded.lm, sampler, loaded.extras.get("n_tokens")).to(device)
        self.step = make_step(self.decoder, device, compile_mode)
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
        """ids: one prompt (list of ints), decoded num_samples times as one batch. Returns dict(texts,
        token_ids (per sample, up to EOS), new_tokens (kept, all samples), steps, prefill_and_first_chunk_s,
        total_s). on_text(str) receives sample 0's text as it grows (streaming)."""
        tok, dev = self.loaded.tokenizer, self.device
        prompt = torch.tensor([ids], dtype=torch.long, device=dev).expand(num_samples, -1).contiguous()
        self._setup(num_samples, len(ids) + max_new_tokens)
        embeds = None
        if pixels is not None:
            embeds = self.loaded.llava.embed(prompt, pixels.to(dev).expand(num_samples, -1, -1, -1))
        eos = None if ignore_eos else tok.eos_id
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
        if _is_cuda(dev):
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        warn_on_tie_overflow(self.decoder)
        if on_text is not None:
            on_text(rows[0].text())
        return dict(texts=[r.text() for r in rows], token_ids=[r.ids for r in rows],
                    new_tokens=sum(len(r.ids) for r in rows), steps=max(r.steps for r in rows),
                    prefill_and_first_chunk_s=t_first - t0, total_s=t1 - t0)


def _is_cuda(dev):
    return str(dev).startswith("cuda")


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


# --- evaluation ----------------------------------------------------------------------------------------

def eval_text(args, loaded, ckpt_args):
    """The validation text: --eval-file, else the checkpoint's own data split through utils/text_data.py."""
    if args.eval_file:
        if not os.path.isfile(args.eval_file):
            _fail(f"--eval-file not found: {args.eval_file}")
        with open(args.eval_file, encoding="utf-8", errors="replace") as f:
            return f.read(), args.eval_file
    from utils.text_data import DataError, load_corpus
    spec = (ckpt_args or {}).get("data") or "shakespeare"
    try:
        corpus = load_corpus(spec, errors="replace", val_fraction=(ckpt_args or {}).get("val_fraction", 0.1))
    except DataError as e:
        _fail(f"{e} (the checkpoint's --data; give --eval-file PATH instead)")
    return corpus[args.eval_split], f"{corpus['source']} [{args.eval_split}]"


@torch.no_grad()
def run_eval(args, loaded, device, ckpt_args=None):
    """Perplexity on the split, then greedy vs the sampler on the same prompts, human text as reference."""
    tok = loaded.tokenizer
    text, source = eval_text(args, loaded, ckpt_args)
    try:
        ids = tok.encode(text)
    except ValueError as e:
        _fail(f"cannot tokenize the evaluation text {source}: {e}")
    lm = loaded.lm
    block = args.eval_block or min(lm.context or 256, 256)
    try:
        ppl = perplexity(lambda x: lm.full_logits(x), ids, block, args.batch_size, device, args.eval_max_tokens)
    except ValueError as e:
        _fail(f"{source}: {e} (lower --eval-block)")
    # degeneration: N prompts cut from the split, each followed by its human continuation
    P, M, N = args.eval_prompt_len, args.max_new_tokens, args.eval_samples
    span = P + M
    if len(ids) < span:
        _fail(f"the evaluation text has {len(ids)} tokens, fewer than --eval-prompt-len + --max-new-tokens = {span}")
    starts = torch.linspace(0, len(ids) - span, N).long().tolist()
    prompts = torch.tensor([ids[s:s + P] for s in starts], dtype=torch.long, device=device)
    human = [ids[s + P:s + span] for s in starts]
    unit = (lambda seq: words(tok.decode(seq))) if args.metric_unit == "word" else list
    report = {"checkpoint": args.ckpt, "eval_text": source, "perplexity": ppl, "block_size": block,
              "prompts": N, "prompt_tokens": P, "new_tokens": M, "unit": args.metric_unit, "seed": args.seed,
              "human": degeneration_metrics([unit(h) for h in human])}
    samplers = {"greedy": SamplerConfig(**{**sampler_from_args(args).to_dict(), "temperature": 0.0}),
                "sampler": sampler_from_args(args)}
    examples = {}
    for name, cfg in samplers.items():
        seed_everything(args.seed)
        dec = Decoder(lm, cfg, loaded.extras.get("n_tokens")).to(device)
        step = make_step(dec, device, args.compile)
        outs = []
        for i in range(0, N, args.batch_size):
            p = prompts[i:i + args.batch_size]
            dec.setup(p.shape[0], span if not lm.context else min(lm.context, span), device)
            outs += torch.cat(list(decode_tokens(dec, step, p, M, sync_every=0)), 1).tolist()
            warn_on_tie_overflow(dec)
        if tok.eos_id is not None:
            outs = [o[:o.index(tok.eos_id)] if tok.eos_id in o else o for o in outs]
        report[name] = degeneration_metrics([unit(o) for o in outs])
        report[name]["config"] = cfg.to_dict()
        examples[name] = tok.decode(outs[0])
    examples["human"] = tok.decode(human[0])
    examples["prompt"] = tok.decode(prompts[0].tolist())
    report["examples"] = examples
    return report


def print_report(r, out=None):
    out = out or sys.stdout
    p = r["perplexity"]
    out.write(f"validation perplexity {p['ppl']:.3f} (loss {p['loss']:.4f} nats/token over {p['tokens']} tokens, "
              f"blocks of {r['block_size']})\n")
    out.write(f"degeneration over {r['prompts']} continuations of {r['new_tokens']} tokens "
              f"(metrics on {r['unit']}s, %):\n")
    keys = [k for k in r["human"] if k != "mean_length"] + ["mean_length"]
    out.write(f"{'metric':<14}{'greedy':>10}{'sampler':>10}{'human':>10}\n")
    for k in keys:
        vals = [r[c][k] for c in ("greedy", "sampler", "human")]
        fmt = (lambda v: f"{v:10.1f}") if k == "mean_length" else (lambda v: f"{100 * v:10.2f}")
        out.write(f"{k:<14}" + "".join(fmt(v) for v in vals) + "\n")


# --- command line --------------------------------------------------------------------------------------

def sampler_from_args(args):
    return SamplerConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                         repetition_penalty=args.repetition_penalty, repetition_window=args.repetition_window,
                         frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                         no_repeat_ngram_size=args.no_repeat_ngram_size)


def build_parser():
    d = SamplerConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", default="checkpoints/coeus/best.pt",
      help="checkpoint file (kind llama / coeus / vqa / detect) or a Hugging Face model folder")
    a("--tokenizer", default=None, help="sentencepiece .model to use instead of the checkpoint's tokenizer")
    a("--prompt", default=None, help="prompt text (default: the tokenizer's BOS, else a newline)")
    a("--prompt-file", default=None, help="read the prompt from this UTF-8 file")
    a("--interactive", action="store_true", help="read prompts from stdin, one per line, until EOF")
    a("--image", default=None, help="image file for a VQA / detection checkpoint")
    a("--max-new-tokens", type=int, default=200, help="tokens to generate per sample")
    a("--num-samples", type=int, default=1, help="samples of the same prompt, decoded together as one batch")
    a("--temperature", type=float, default=d.temperature, help="softmax temperature; 0 = greedy")
    a("--greedy", action="store_true", help="same as --temperature 0")
    a("--top-k", type=int, default=d.top_k, help="keep the k most likely tokens (ties kept); 0 = off")
    a("--top-p", type=float, default=d.top_p, help="nucleus: smallest set with this much mass; 1 = off")
    a("--min-p", type=float, default=d.min_p, help="drop tokens below min-p x the top probability; 0 = off")
    a("--repetition-penalty", type=float, default=d.repetition_penalty,
      help="HF semantics: logits of context tokens divided (if > 0) or multiplied (if < 0) by this; 1 = off")
    a("--repetition-window", type=int, default=d.repetition_window,
      help="the repetition penalty sees only the last N context tokens; 0 = the whole context")
    a("--frequency-penalty", type=float, default=d.frequency_penalty,
      help="subtract this x (count of the token in the generated text) from its logit")
    a("--presence-penalty", type=float, default=d.presence_penalty,
      help="subtract this from the logit of every token already generated")
    a("--no-repeat-ngram-size", type=int, default=d.no_repeat_ngram_size,
      help="never repeat an n-gram of the context (HF's no_repeat_ngram_size); 0 = off")
    a("--stop", action="append", default=[], help="stop string (repeatable); the text is cut before it")
    a("--ignore-eos", action="store_true", help="keep generating after the EOS token")
    a("--truncate-left", action="store_true",
      help="a prompt too long for a Llama context keeps its last tokens instead of failing")
    a("--seed", type=int, default=1337, help="random seed")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
      help="weights dtype; auto = bfloat16 on CUDA, float32 on CPU")
    a("--compile", default="auto", choices=["auto", "on", "off"],
      help="torch.compile the decode step; auto = on for CUDA (CUDA graphs), off on CPU")
    a("--sync-every", type=int, default=16,
      help="the host reads new tokens (streaming, EOS, stop strings) once per this many tokens")
    a("--quiet", action="store_true", help="print only the generated text, no timing line")
    a("--out", default=None, help="append prompts and samples as JSON lines to this file")
    e = p.add_argument_group("evaluation (--eval)")
    e.add_argument("--eval", action="store_true",
                   help="report validation perplexity and degeneration metrics (greedy vs the sampler)")
    e.add_argument("--eval-file", default=None, help="UTF-8 text to evaluate on (default: the checkpoint's split)")
    e.add_argument("--eval-split", default="val", choices=["val", "train"],
                   help="split of the checkpoint's training data (its --data) when no --eval-file")
    e.add_argument("--eval-block", type=int, default=0, help="perplexity block length (0 = min(context, 256))")
    e.add_argument("--eval-max-tokens", type=int, default=200_000, help="cap on the tokens scored for perplexity")
    e.add_argument("--eval-samples", type=int, default=32, help="continuations per sampler")
    e.add_argument("--eval-prompt-len", type=int, default=32, help="prompt tokens cut from the split")
    e.add_argument("--metric-unit", default="word", choices=["word", "token"],
                   help="degeneration metrics over whitespace words of the decoded text, or over token ids")
    e.add_argument("--batch-size", type=int, default=32, help="rows per forward in --eval")
    e.add_argument("--eval-out", default=None, help="JSON report path (default: next to the checkpoint)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.greedy:
        args.temperature = 0.0
    try:
        sampler = sampler_from_args(args).validate()
    except ValueError as e:
        _fail(str(e))
    if args.max_new_tokens < 1 or args.num_samples < 1:
        _fail("--max-new-tokens and --num-samples must be >= 1")
    device = pick_device(args.device)
    dtype = {"auto": torch.bfloat16 if _is_cuda(device) else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    seed_everything(args.seed)
    loaded = load_model(args.ckpt, device, dtype, args.tokenizer)
    if args.eval:
        ckpt_args = None
        if os.path.isfile(args.ckpt):
            ckpt_args = load_checkpoint(args.ckpt).get("args")
        report = run_eval(args, loaded, device, ckpt_args)
        print_report(report)
        out = args.eval_out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)) if os.path.isfile(args.ckpt)
                                            else args.ckpt, "generate_eval.json")
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, out)
        print(f"report written to {out}")
        return report
    session = Session(loaded, sampler, device, args.compile)
    stream = args.num_samples == 1
    results = []

    def run(text):
        ids, pixels = encode_prompt(loaded, text, args.image)
        ids = fit_context(ids, args.max_new_tokens, loaded.lm.context, args.truncate_left, pixels is not None)
        if stream:
            sys.stdout.write(text if loaded.llava is None else "")
        res = session.generate(ids, args.num_samples, args.max_new_tokens, pixels, args.stop, args.sync_every,
                               on_text=Streamer() if stream else None, ignore_eos=args.ignore_eos)
        if stream:
            sys.stdout.write("\n")
        else:
            for i, t in enumerate(res["texts"]):
                sys.stdout.write(f"--- sample {i} ---\n{text if loaded.llava is None else ''}{t}\n")
        sys.stdout.flush()
        if not args.quiet:
            tps = res["new_tokens"] / res["total_s"] if res["total_s"] > 0 else float("nan")
            first_ms = res["prefill_and_first_chunk_s"] * 1e3
            print(f"[{len(ids)} prompt tokens, {res['new_tokens']} new in {res['total_s']:.2f} s: {tps:.1f} tokens/s "
                  f"over {args.num_samples} sample(s); first chunk after {first_ms:.0f} ms]", file=sys.stderr)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"prompt": text, "samples": res["texts"], "sampler": sampler.to_dict(),
                                    "seed": args.seed}) + "\n")
        results.append(res)

    if args.interactive:
        tty = sys.stdin.isatty()
        while True:
            if tty:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            if line.strip():
                try:
                    run(line.rstrip("\n"))
                except SystemExit as e:  # a bad prompt ends that prompt, not the session
                    print(e, file=sys.stderr)
        return results
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            _fail(f"--prompt-file not found: {args.prompt_file}")
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
    elif args.prompt is not None:
        text = args.prompt
    else:
        text = "" if loaded.tokenizer.bos_id is not None or loaded.llava is not None else "\n"
    run(text)
    return results


if __name__ == "__main__":
    main()
