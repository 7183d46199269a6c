"""Sample from any checkpoint this project writes, fast and exactly as transformers' samplers do.

    python generate.py --ckpt checkpoints/coeus/best.pt --prompt "ROMEO:"          # stream one sample
    python generate.py --ckpt ckpt.pt --prompt "ROMEO:" --num-samples 4 --seed 1   # 4 samples as one batch
    python generate.py --ckpt ckpt.pt --temperature 0                               # greedy
    python generate.py --ckpt ckpt.pt --interactive                                 # one prompt per stdin line
    python generate.py --ckpt vqa.pt --image cat.jpg --prompt "What is in the picture?"
    python generate.py --ckpt vqa.pt --image a.png --image b.png --prompt "<image> and <image>: same colour?"
    python generate.py --ckpt path/to/TinyLlama-folder --prompt "Once upon a time"  # HF LlamaForCausalLM folder
    python generate.py --ckpt ckpt.pt --eval --eval-file data/valid.txt             # perplexity + degeneration

Checkpoint kinds: "llama" and "coeus" (train_coeus.py), "vqa" (train_vqa.py), "detect" (train_detect.py,
its LLaVA side), and Hugging Face folders (LlamaForCausalLM / LlavaForConditionalGeneration) read through
models/hf_weights.py; utils/load_model.py loads them all.

How it is fast (gpt-fast's recipe, in utils/decoding.py): the prompt runs once (prefill) into a static KV
cache (Llama) or the recurrent state (Coeus); then each token is one call of a fixed-shape decode step, replayed
on CUDA as a CUDA graph (--compile: captured as it runs around the fused decode kernels, or compiled). Penalties
and filters work on preallocated buffers and sampling happens on the device (utils/sampling.py), so the token loop
never waits for the host; the host reads the tokens once every --sync-every tokens to stream text and check EOS /
stop strings.
"""
import time  # noqa: I001 - the clock first: the start-up a user waits for includes the imports

T_IMPORT = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.data_files import open_image  # noqa: E402
from utils.decoding import (PREFILL_MODES, STEP_MODES, Decoder, Session, Streamer, decode_tokens,  # noqa: E402
                            inference_lm, make_step, warn_on_tie_overflow)
from utils.lm_metrics import degeneration_metrics, perplexity, words  # noqa: E402
from utils.load_model import fail, load_model  # noqa: E402
from utils.errors import DataError  # noqa: E402
from utils.runtime import pick_device, seed_everything  # noqa: E402
from utils.sampling import SamplerConfig  # noqa: E402
from utils.text_data import load_corpus, read_text  # noqa: E402


# --- prompts -------------------------------------------------------------------------------------------

def encode_prompt(loaded, text, images=None):
    """-> (ids: list[int], pixel_values (n_images, 3, H, W) or None).

    images: one path or a list of paths (--image, repeatable). The k-th <image> of the prompt stands for the
    k-th image; a prompt with fewer tags than images gets the missing ones put in front (one per line, so the
    first images go there), one with more tags than images is an error."""
    tok = loaded.tokenizer
    images = [images] if isinstance(images, str) else list(images or [])
    if loaded.llava is None:
        if images:
            fail("--image needs a VQA (or detection) checkpoint")
        try:
            ids = tok.encode(text)
        except ValueError as e:
            fail(f"cannot encode the prompt: {e}")
        if tok.bos_id is not None:
            ids = [tok.bos_id] + ids
        if not ids:
            fail("the prompt is empty and the tokenizer has no BOS token to start from; give --prompt")
        return ids, None
    from utils.chat import IMAGE_TAG, encode_conversation
    ex = loaded.extras
    n_tags = text.count(IMAGE_TAG)
    if n_tags > len(images):
        fail(f"the prompt holds {n_tags} {IMAGE_TAG} tag(s) but {len(images)} --image was given"
             if images else f"the prompt holds {IMAGE_TAG} but no --image was given")
    pixels = []
    for path in images:
        try:
            img = open_image(path)  # missing, truncated, not an image, a decompression bomb: one line
        except DataError as e:
            fail(str(e))
        pixels.append(ex["processor"](img))
    text = (IMAGE_TAG + "\n") * (len(images) - n_tags) + text
    try:
        enc = encode_conversation([{"from": "human", "value": text}], tok, ex["image_token_id"],
                                  loaded.llava.num_image_tokens, max_len=10 ** 9, template=ex["template"])
    except ValueError as e:
        fail(f"cannot encode the prompt: {e}")
    return enc["input_ids"], (torch.stack(pixels) if pixels else None)


def fit_context(ids, max_new_tokens, context, truncate_left, has_image=False):
    """A Llama context holds prompt + new tokens; too long is an error naming the limit, or a left cut."""
    if context is None or len(ids) + max_new_tokens <= context:
        return ids
    if max_new_tokens >= context:
        fail(f"--max-new-tokens {max_new_tokens} does not fit the model's context of {context} tokens")
    if not truncate_left or has_image:
        fail(f"the prompt is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that is "
             f"{len(ids) + max_new_tokens}, over the model's context of {context} tokens "
             f"(shorten it, lower --max-new-tokens{'' if has_image else ', or pass --truncate-left'})")
    return ids[len(ids) + max_new_tokens - context:]


# --- evaluation ----------------------------------------------------------------------------------------

def eval_text(args, loaded, ckpt_args):
    """The validation text: --eval-file, else the checkpoint's own data split through utils/text_data.py."""
    if args.eval_file:
        try:
            return read_text(args.eval_file, errors="replace"), args.eval_file
        except DataError as e:
            fail(f"--eval-file: {e}")
    spec = (ckpt_args or {}).get("data") or "shakespeare"
    try:
        corpus = load_corpus(spec, errors="replace", val_fraction=(ckpt_args or {}).get("val_fraction", 0.1))
    except DataError as e:
        fail(f"{e} (the checkpoint's --data; give --eval-file PATH instead)")
    return corpus[args.eval_split], f"{corpus['source']} [{args.eval_split}]"


@torch.no_grad()
def run_eval(args, loaded, device, ckpt_args=None):
    """Perplexity on the split, then greedy vs the sampler on the same prompts, human text as reference."""
    tok = loaded.tokenizer
    text, source = eval_text(args, loaded, ckpt_args)
    try:
        ids = tok.encode(text)
    except ValueError as e:
        fail(f"cannot tokenize the evaluation text {source}: {e}")
    lm = loaded.lm
    block = args.eval_block or min(lm.context or 256, 256)
    try:
        ppl = perplexity(lambda x: lm.full_logits(x), ids, block, args.batch_size, device, args.eval_max_tokens)
    except ValueError as e:
        fail(f"{source}: {e} (lower --eval-block)")
    # degeneration: N prompts cut from the split, each followed by its human continuation
    P, M, N = args.eval_prompt_len, args.max_new_tokens, args.eval_samples
    span = P + M
    if len(ids) < span:
        fail(f"the evaluation text has {len(ids)} tokens, fewer than --eval-prompt-len + --max-new-tokens = {span}")
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
        step = make_step(dec, device, args.compile, prefill=args.prefill, batch=args.batch_size)
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
    a("--adapter", default=None, help="a peft LoRA adapter folder (adapter_config.json + adapter_model.safetensors, "
      "e.g. a run's --out/adapter) put onto the --ckpt Hugging Face folder and merged before decoding")
    a("--prompt", default=None, help="prompt text (default: the tokenizer's BOS, else a newline)")
    a("--prompt-file", default=None, help="read the prompt from this UTF-8 file")
    a("--replace-invalid", action="store_true", help="--prompt-file: replace bytes that are not UTF-8 with U+FFFD "
      "instead of stopping")
    a("--interactive", action="store_true", help="read prompts from stdin, one per line, until EOF")
    a("--image", action="append", default=None, help="image file for a VQA / detection checkpoint; repeat it for "
      "several images (--image a.png --image b.png): the k-th <image> of the prompt is the k-th image; missing "
      "<image> tags are put in front of the prompt (one per line), more tags than images is an error")
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
    a("--compile", default="auto", choices=list(STEP_MODES),
      help="the decode step: on = torch.compile with CUDA graphs (a minute of compilation on a GPU); graph = "
           "captured as a CUDA graph as it runs, its small glue compiled (seconds); off = eager; auto = graph on "
           "CUDA where the layers run as the fused decode kernels (a Llama-family model, one sample), else on for "
           "CUDA, off on CPU")
    a("--prefill", default="auto", choices=list(PREFILL_MODES),
      help="the prompt's forward: graph = a CUDA graph per prompt length (the first prompt of a length runs eagerly), "
           "compile = torch.compile with dynamic shapes (tens of seconds first), eager; auto = graph on CUDA unless "
           "--compile off")
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


def main(argv=None, t_start=None):
    """t_start: the perf_counter the start-up is counted from (the script passes the time before its imports;
    a caller in-process, this call's start)."""
    t_main = time.perf_counter()
    t_start = t_main if t_start is None else t_start
    args = build_parser().parse_args(argv)
    if args.greedy:
        args.temperature = 0.0
    try:
        sampler = sampler_from_args(args).validate()
    except ValueError as e:
        fail(str(e))
    if args.max_new_tokens < 1 or args.num_samples < 1:
        fail("--max-new-tokens and --num-samples must be >= 1")
    device = pick_device(args.device)
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    seed_everything(args.seed)
    loaded = load_model(args.ckpt, device, dtype, args.tokenizer, adapter=args.adapter)
    t_loaded = time.perf_counter()
    # generate never trains or saves: fused projections, and on CUDA batch-1 steps through kernels/ (tuned here)
    loaded.lm = inference_lm(loaded.lm, device)
    t_ready = time.perf_counter()
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
    session = Session(loaded, sampler, device, args.compile, args.prefill, batch=args.num_samples)
    stream = args.num_samples == 1
    results = []

    def run(text):
        ids, pixels = encode_prompt(loaded, text, args.image)
        ids = fit_context(ids, args.max_new_tokens, loaded.lm.context, args.truncate_left, pixels is not None)
        if stream:
            sys.stdout.write(text if loaded.llava is None else "")
        t_call = time.perf_counter()
        res = session.generate(ids, args.num_samples, args.max_new_tokens, pixels, args.stop, args.sync_every,
                               on_text=Streamer() if stream else None, ignore_eos=args.ignore_eos)
        if not results:  # the start-up a user waits for (issue 19: <= 30 s cold, <= 10 s warm on a GPU)
            res["startup_s"] = startup = {
                "first_tokens": res["first_chunk_clock"] - t_start, "imports": t_main - t_start,
                "loading": t_loaded - t_main, "kernel_tuning": t_ready - t_loaded,
                "first_call": res["first_chunk_clock"] - t_call}
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
            if "startup_s" in res:
                print(f"[start-up: first tokens {startup['first_tokens']:.1f} s after the start (imports "
                      f"{startup['imports']:.1f} s, loading {startup['loading']:.1f} s, decode kernels tuned "
                      f"{startup['kernel_tuning']:.1f} s, set-up + prefill + compilation + first chunk "
                      f"{startup['first_call']:.1f} s)]", file=sys.stderr)
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
        try:  # not UTF-8: one line with the byte offset, unless --replace-invalid
            text = read_text(args.prompt_file, errors="replace" if args.replace_invalid else "strict")
        except DataError as e:
            fail(f"--prompt-file: {e}")
    elif args.prompt is not None:
        text = args.prompt
    else:
        text = "" if loaded.tokenizer.bos_id is not None or loaded.llava is not None else "\n"
    run(text)
    return results


if __name__ == "__main__":
    main(t_start=T_IMPORT)
