"""Load any checkpoint this project writes, or a Hugging Face folder, for inference: model, tokenizer, extras.

    loaded = load_model("checkpoints/vqa/best.pt", device="cuda", dtype=torch.bfloat16)
    loaded.kind, loaded.lm, loaded.tokenizer, loaded.llava, loaded.extras

Kinds: "llama" and "coeus" (train_coeus.py), "vqa" (train_vqa.py), "detect" (train_detect.py, its LLaVA side),
and Hugging Face folders (LlamaForCausalLM / LlavaForConditionalGeneration) read through models/hf_weights.py.
Loading only loads: the model keeps the checkpoint's parameters (not fused, nothing tuned), so a training
script may start from it too; generate.py makes the decoding adapter afterwards (utils.decoding.inference_lm).
Bad input ends in one line, `error: ...` (SystemExit).
"""
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from models.hf_weights import no_init_weights
from utils.adapters import load_merged
from utils.checkpoint import load_checkpoint
from utils.decoding import CoeusLM, LlamaLM

KINDS = ("llama", "coeus", "vqa", "detect")


@dataclass
class Loaded:
    kind: str
    lm: nn.Module                   # LlamaLM or CoeusLM, plain (utils.decoding.inference_lm: the fast one)
    tokenizer: object
    llava: nn.Module = None         # the LlavaModel for VQA / detection checkpoints
    extras: dict = field(default_factory=dict)  # image processor, chat template, image token id


def fail(msg):
    raise SystemExit(f"error: {msg}")


def load_model(path, device="cpu", dtype=torch.float32, tokenizer_path=None, adapter=None):
    """A checkpoint file of this project or an HF folder -> Loaded. Bad input ends in one clear line.
    adapter: a peft LoRA folder put onto an HF folder's model and merged. A checkpoint of a LoRA / QLoRA run
    (its `lora` entry) gets its adapters rebuilt, loaded and merged: the model that returns is plain."""
    from utils.tokenizer import SentencePieceTokenizer, tokenizer_from_dict
    if os.path.isdir(path):
        return _load_hf_folder(path, device, dtype, tokenizer_path, adapter)
    if adapter:
        fail(f"--adapter goes onto a Hugging Face base folder; {path} is a checkpoint file (a LoRA run's "
             "checkpoint already holds its adapters)")
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    kind, mc = ckpt["kind"], ckpt.get("model_config")
    if kind not in KINDS:
        fail(f"{path} holds a model of kind {kind!r}; generate.py reads {', '.join(KINDS)} checkpoints "
             "or a Hugging Face folder")
    llava, extras = None, {}
    try:
        if kind == "llama":
            from models.llama import Llama, LlamaConfig
            with no_init_weights():  # the checkpoint sets every weight (load_state_dict is strict)
                model = Llama(LlamaConfig(**mc))
            model = load_merged(model, ckpt["model"], ckpt.get("lora"))
        elif kind == "coeus":
            from models.coeus import Coeus, CoeusConfig
            with no_init_weights():
                model = Coeus(CoeusConfig(**mc))
            model.load_state_dict(ckpt["model"])
        else:
            from models.llava import LlavaConfig, LlavaModel
            if kind == "detect":  # the detection model wraps a LlavaModel as `llava.`
                mc = mc["llava"]
                state = {k[len("llava."):]: v for k, v in ckpt["model"].items() if k.startswith("llava.")}
            else:
                state = ckpt["model"]
            with no_init_weights():
                llava = LlavaModel(LlavaConfig.from_dict(mc))
            llava = load_merged(llava, state, ckpt.get("lora"))
            model = llava.language_model
            extras = _vqa_extras(ckpt, llava)
    except (TypeError, KeyError, RuntimeError) as e:
        fail(f"{path}: the '{kind}' checkpoint does not fit its model ({type(e).__name__}: "
             f"{str(e).splitlines()[0]})")
    if tokenizer_path:
        tok = SentencePieceTokenizer.from_file(tokenizer_path)
    elif "tokenizer" in ckpt:
        tok = tokenizer_from_dict(ckpt["tokenizer"])
    else:
        fail(f"{path} carries no tokenizer; pass --tokenizer PATH (a sentencepiece .model)")
    return _finish(kind, model, tok, llava, extras, device, dtype, path)


def _vqa_extras(ckpt, llava):
    from utils.chat import ChatTemplate
    from utils.image_processing import ImageProcessor
    extras = {"image_token_id": ckpt.get("special_tokens", {}).get("image", llava.config.image_token_id),
              "template": ChatTemplate(**ckpt["template"]) if "template" in ckpt else ChatTemplate()}
    extras["processor"] = (ImageProcessor.from_dict(ckpt["image_processor"]) if "image_processor" in ckpt
                           else ImageProcessor.for_vision(llava.config.vision))  # CLIP's or SigLIP's
    return extras


def _load_hf_folder(path, device, dtype, tokenizer_path, adapter=None):
    from models.hf_weights import decoder_family, detect_family, load_pretrained, read_config
    from utils.tokenizer import SentencePieceTokenizer, tokenizer_from_folder
    try:
        family = detect_family(read_config(path))
        if family not in ("llama", "qwen2", "llava"):
            fail(f"{path} is a {family!r} model; generate.py reads LlamaForCausalLM, Qwen2ForCausalLM and LLaVA "
                 "folders")
        # straight onto the device in the dtype decoding runs in (a 1.1B model's fp32 copy on the CPU cost seconds
        # of the start-up); in fp32 on the CPU when an adapter is merged into it first
        model = load_pretrained(path, dtype=torch.float32 if adapter else dtype, device="cpu" if adapter else device)
        if adapter:
            from models.lora import merge_lora
            from utils.adapters import load_adapter
            try:
                load_adapter(model, adapter)
            except (FileNotFoundError, ValueError) as e:
                fail(f"--adapter {adapter}: {e}")
            merge_lora(model)
        # a folder with both tokenizer.json and a sentencepiece tokenizer.model (Llama-2, TinyLlama) reads the latter,
        # as this project's checkpoints of those models were tokenized
        tok = SentencePieceTokenizer.from_file(tokenizer_path) if tokenizer_path else \
            tokenizer_from_folder(path, prefer_sentencepiece=True)
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(f"{path}: {e}")
    if family == "llava":
        from utils.chat import template_for
        from utils.image_processing import ImageProcessor
        extras = {"image_token_id": model.config.image_token_id,
                  "template": template_for(decoder_family(model.config.text), tok),  # Llama-3 / ChatML / LLaVA
                  "processor": ImageProcessor.for_vision(model.config.vision)}
        return _finish("vqa", model.language_model, tok, model, extras, device, dtype, path)
    return _finish("llama", model, tok, None, {}, device, dtype, path)


def check_vocab(tok, model_vocab, image_token_id=None, source=""):
    """The tokenizer must index the model's rows: at most the model's vocabulary (an image placeholder past
    it excepted), and the model padded by at most 1 % (or 1,024 rows) beyond it: Qwen2.5 pads its 151,665
    tokens to 151,936 rows; rows no token maps to are never sampled (utils.decoding.Decoder bans them)."""
    n = tok.vocab_size
    if image_token_id is not None and image_token_id >= model_vocab and image_token_id == n - 1:
        n -= 1  # the <image> placeholder is never embedded (see models/llava.py)
    if n > model_vocab or model_vocab > n + max(1024, n // 100):
        fail(f"{source}: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {model_vocab} "
             "(a tokenizer of another model?)")
    return n


def _finish(kind, model, tok, llava, extras, device, dtype, source):
    is_coeus = type(model).__name__ == "Coeus"
    n = check_vocab(tok, model.config.vocab_size, extras.get("image_token_id"), source)
    extras["n_tokens"] = n
    target = llava if llava is not None else model
    target.to(device=device, dtype=dtype).eval()
    # the weights as the checkpoint has them (trainable, saveable): no fused projections, no kernels tuned
    lm = CoeusLM(model) if is_coeus else LlamaLM(model)
    return Loaded(kind, lm, tok, llava, extras)
