"""LoRA / QLoRA for the training scripts: one set of flags, one way to apply them, the adapter folder peft reads.

    add_lora_args(parser)                                    # --lora-r/-alpha/-dropout/-targets, --rslora, --qlora
    spec = lora_spec(args, dtype_name)                       # None without adapters; a plain dict checkpoints keep
    report = apply_lora_spec(model, spec, train_modules=("projector",))   # QLoRA's 4-bit base, adapters, freezing
    save_adapter(out / "adapter", model, base=args.init_llm, modules_to_save=("projector",))
    load_adapter(model, folder)                              # a peft adapter folder (ours or peft's) onto our model

The adapters sit only in the language model (models/lora.py); with --qlora its Linears but the head hold NF4
weights (models/nf4.py). The adapter folder is peft's: adapter_config.json + adapter_model.safetensors keyed by
the transformers module paths (`base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight`),
the fully trained modules (the projector) in it as peft's `modules_to_save`, so
`PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), folder)` gives our model.
"""
import json
import os

import torch

from models.lora import LoRALinear, adapter_config, apply_lora, format_report  # noqa: F401 (format_report re-exported)

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# our names of the modules a run trains in full -> transformers' (peft's modules_to_save are matched by name)
HF_MODULE_NAMES = {"projector": "multi_modal_projector", "vision_tower": "vision_tower", "embed_tokens": "embed_tokens",
                   "lm_head": "lm_head"}


def add_lora_args(p):
    g = p.add_argument_group("LoRA / QLoRA (adapters in the language model; docs/lora.md)")
    g.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0 = no adapters, the decoder trains in full "
                   "(--qlora alone means r 64)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x r): the update is "
                   "scaled by alpha / r")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", default="all-linear", help="Linear names to adapt, e.g. q_proj,v_proj; "
                   "all-linear = every Linear of the decoder but its head")
    g.add_argument("--rslora", action="store_true", help="rsLoRA scaling alpha / sqrt(r)")
    g.add_argument("--qlora", action="store_true", help="QLoRA: the decoder's Linears (head excepted) in 4-bit NF4 "
                   "(block 64, double-quantised absmax), adapters trained on top in the compute dtype")
    g.add_argument("--merge-lora", action="store_true", help="at the end also write the adapters folded into the "
                   "base: merged.pt (and merged_hf/ when the decoder came from a Hugging Face folder)")
    return g


def lora_spec(args, dtype_name="float32"):
    """The adapters a run asks for as a plain dict (kept in checkpoints so loaders rebuild the same model), or
    None. dtype_name: the run's compute dtype, where QLoRA's dequantised weights are computed."""
    r = args.lora_r or (64 if args.qlora else 0)
    if r <= 0:
        return None
    return dict(r=r, alpha=args.lora_alpha if args.lora_alpha is not None else 2 * r, dropout=args.lora_dropout,
                targets=args.lora_targets, rslora=args.rslora, qlora=args.qlora, blocksize=64, double_quant=True,
                compute_dtype=dtype_name if args.qlora else None)


def lora_of_run(args, ckpt, dtype_name, source=None):
    """The adapters of a script's run (a spec, or None): the flags' for a new run, the checkpoint's otherwise;
    --resume with other LoRA flags than the run was started with ends in one line naming both (SystemExit)."""
    wanted = lora_spec(args, dtype_name)
    if ckpt is None:
        return wanted
    have = ckpt.get("lora")
    if getattr(args, "resume", None) and have != wanted:
        raise SystemExit(f"error: --resume {source or args.resume}: the run was started with LoRA {have} but the "
                         f"flags ask for {wanted}; pass the same --lora-* / --qlora flags")
    return have


def language_model_of(model):
    return getattr(model, "language_model", model)


def quantize_base(model, spec):
    """QLoRA's base: every Linear of the language model but its head in NF4 (a no-op on layers already 4-bit)."""
    from models.nf4 import quantize_linears
    return quantize_linears(language_model_of(model), skip=("lm_head",), blocksize=spec["blocksize"],
                            double_quant=spec["double_quant"], compute_dtype=getattr(torch, spec["compute_dtype"]))


def apply_lora_spec(model, spec, train_modules=()):
    """Quantise (spec["qlora"]) and wrap the language model's targets in LoRALinear; everything else frozen but
    train_modules. Returns models.lora's report."""
    if spec.get("qlora"):
        quantize_base(model, spec)
    return apply_lora(model, spec["targets"], r=spec["r"], alpha=spec["alpha"], dropout=spec["dropout"],
                      use_rslora=spec["rslora"], train_modules=train_modules)


def load_merged(model, state, spec=None):
    """A checkpoint's state into model with its adapters folded in: the spec's adapters (and 4-bit base) first
    when it has one, then the weights, then merge_lora. Returns the plain model (no LoRALinear left)."""
    from models.lora import merge_lora
    if spec:
        apply_lora_spec(model, spec)
    model.load_state_dict(state)
    return merge_lora(model) if spec else model


def export_merged_hf(model, folder, base):
    """A merged model as a Hugging Face folder, with the tokenizer files of the base folder it came from."""
    import shutil
    from models.hf_weights import export_pretrained
    export_pretrained(model, folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        if os.path.isfile(os.path.join(base, name)):
            shutil.copy2(os.path.join(base, name), os.path.join(folder, name))
    return folder


# --- peft's adapter folder ---------------------------------------------------------------------------------

def _adapters(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _modules_named(model, name):
    """(path, module) of the modules whose path is `name` or ends in it (projector, embed_tokens)."""
    hits = [(n, m) for n, m in model.named_modules() if n and (n == name or n.rpartition(".")[2] == name)]
    if not hits:
        raise ValueError(f"modules_to_save entry {name!r} matches no module")
    return hits


def save_adapter(folder, model, base=None, modules_to_save=()):
    """Write peft's adapter folder for `model`'s adapters (+ the fully trained modules_to_save, our names) under
    the current transformers module paths; returns the folder. Each file is written to a temp name, then renamed."""
    from safetensors.torch import save_file
    from models.hf_weights import hf_key, hf_module_path
    adapters = _adapters(model)
    if not adapters:
        raise ValueError("the model has no LoRA adapters to save")
    state = {}
    for path, m in adapters:
        hp = hf_module_path(model, path)
        state[f"{PEFT_PREFIX}{hp}.lora_A.weight"] = m.lora_A.weight.detach()
        state[f"{PEFT_PREFIX}{hp}.lora_B.weight"] = m.lora_B.weight.detach()
    for name in modules_to_save:  # peft strips its `modules_to_save.default.` wrapper when saving: plain keys
        for path, module in _modules_named(model, name):
            for k, v in module.state_dict().items():
                state[PEFT_PREFIX + hf_key(model, f"{path}.{k}")] = v.detach()
    cfg = adapter_config(model, base_model_name_or_path=base)
    if hasattr(model, "language_model"):  # peft matches names anywhere: keep it out of the vision tower's q/k/v
        cfg["target_modules"] = rf".*language_model\..*\.({'|'.join(cfg['target_modules'])})"
    # peft wraps them by their transformers module name
    cfg["modules_to_save"] = sorted(HF_MODULE_NAMES.get(n, n) for n in modules_to_save) or None
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, ADAPTER_WEIGHTS + ".tmp")
    save_file({k: v.cpu().contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, ADAPTER_WEIGHTS))
    tmp = os.path.join(folder, ADAPTER_CONFIG + ".tmp")
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, os.path.join(folder, ADAPTER_CONFIG))
    return folder


def read_adapter_config(folder):
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG} (expected a peft LoRA adapter folder)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: a {cfg.get('peft_type')} adapter; only LoRA adapters load here")
    for k in ("rank_pattern", "alpha_pattern"):
        if cfg.get(k):
            raise ValueError(f"{path}: per-module {k} is not supported here (one r / alpha for every adapter)")
    if cfg.get("bias", "none") != "none" or cfg.get("fan_in_fan_out"):
        raise ValueError(f"{path}: bias={cfg.get('bias')!r} / fan_in_fan_out adapters are not supported here")
    return cfg


def load_adapter(model, folder):
    """Put a peft LoRA adapter folder onto `model` (our Llama / Qwen2 / LlavaModel of the adapter's base): wraps
    the targets if they are not wrapped yet, loads A / B (either transformers layout) and modules_to_save.
    Missing or mis-shaped tensors are one ValueError naming them. Returns models.lora's report."""
    from safetensors.torch import load_file
    from models.hf_weights import hf_key, hf_module_path
    cfg = read_adapter_config(folder)
    weights = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS}")
    state = load_file(weights)
    # the wrapped names from the tensors themselves (target_modules may be a list, a regex or "all-linear")
    targets = sorted({k[:-len(".lora_A.weight")].rpartition(".")[2] for k in state if k.endswith(".lora_A.weight")})
    if not targets:
        raise ValueError(f"{weights}: no lora_A tensors (not a LoRA adapter?)")
    if not _adapters(model):
        apply_lora(model, targets, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                   use_rslora=cfg.get("use_rslora", False))
    adapters = _adapters(model)

    def key_of(path, layout, which):
        return f"{PEFT_PREFIX}{hf_module_path(model, path, layout)}.{which}.weight"
    layout = max(("current", "legacy"), key=lambda lay: sum(key_of(p, lay, "lora_A") in state for p, _ in adapters))
    missing, misshaped, used = [], [], set()

    def take(k, dst):  # the file's tensor k into dst, or why not
        if k not in state:
            missing.append(k)
        elif state[k].shape != dst.shape:
            misshaped.append(f"{k} file {tuple(state[k].shape)} vs model {tuple(dst.shape)}")
        else:
            dst.copy_(state[k])
            used.add(k)
    with torch.no_grad():
        for path, m in adapters:
            for which in ("lora_A", "lora_B"):
                take(key_of(path, layout, which), getattr(m, which).weight)
        ours_by_hf = {v: k for k, v in HF_MODULE_NAMES.items()}
        for name in cfg.get("modules_to_save") or []:
            if name not in ours_by_hf:
                raise ValueError(f"{folder}: modules_to_save {name!r} is none of {sorted(ours_by_hf)}")
            for path, module in _modules_named(model, ours_by_hf[name]):
                for k, dst in module.state_dict().items():
                    take(PEFT_PREFIX + hf_key(model, f"{path}.{k}", layout), dst)
    if missing or misshaped:
        parts = [f"{what} ({len(x)}): {', '.join(x[:6])}{' ...' if len(x) > 6 else ''}"
                 for what, x in (("missing", missing), ("mis-shaped", misshaped)) if x]
        raise ValueError(f"{folder}: the adapter does not fit this model; " + "; ".join(parts))
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"{folder}: adapter tensors this model has no place for ({len(unused)}): "
                         f"{', '.join(unused[:6])}{' ...' if len(unused) > 6 else ''}")
    from models.lora import lora_report
    return lora_report(model)
