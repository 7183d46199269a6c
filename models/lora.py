"""LoRA adapters in plain PyTorch: wrap chosen nn.Linear layers of any model in models/, train only the adapters.

References: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685);
Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (rsLoRA, arXiv:2312.03732);
huggingface/peft src/peft/tuners/lora/layer.py (`LoraLayer.update_layer`, `reset_lora_parameters`, `Linear.merge`),
whose init, scaling, state-dict key names and adapter_config.json fields are mirrored here.

    y = base(x) + dropout(x) @ A^T @ B^T * scale,   A: (r, in), B: (out, r), scale = alpha / r  (rsLoRA: alpha / sqrt(r))

Usage:
    report = apply_lora(model, "q_proj,k_proj,v_proj,o_proj", r=8, alpha=16)   # LLaVA: train_modules=("projector",)
    print(format_report(report))
    ...train: only parameters with requires_grad are the adapters (+ train_modules)...
    save_file(lora_state_dict(model), "adapter_model.safetensors"); json.dump(adapter_config(model), f)
    merge_lora(model)   # plain nn.Linear again, state dict keys equal the base model's

A model with a `language_model` attribute (LlavaModel) gets its adapters only inside `language_model`; the
vision tower and projector stay as they are (pass train_modules=("projector",) to train the projector fully).
Paths in `lora_state_dict` are our module paths; our Llama's are HF's minus the `model.` wrapper, so for a
checkpoint meant for transformers' LlamaForCausalLM pass prefix="base_model.model.model.".
Code that reads `.weight` of a wrapped layer directly (fused loss, fuse_projections) sees base + delta, without
dropout; fuse_projections is inference-only: call merge_lora first.
"""
import math

import torch
import torch.nn as nn

from models.nf4 import Linear4bit

BASE_TYPES = (nn.Linear, Linear4bit)  # what an adapter wraps: a dense Linear or QLoRA's 4-bit one


class LoRALinear(nn.Module):
    def __init__(self, base, r=8, alpha=16, dropout=0.0, use_rslora=False):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base
        self.base.requires_grad_(False)
        self.r, self.alpha, self.dropout_p, self.use_rslora = r, alpha, dropout, use_rslora
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        if self.quantized:  # QLoRA: fp32 adapters on the 4-bit base (autocast computes them in bf16)
            device, dtype = next(base.buffers()).device, torch.float32
        else:
            device, dtype = base.weight.device, base.weight.dtype
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=dtype)   # weight (r, in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=dtype)  # weight (out, r)
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        # peft's reset_lora_parameters(init_lora_weights=True): A Kaiming-uniform, B zero -> delta starts at 0
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def quantized(self):
        return isinstance(self.base, Linear4bit)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    @property
    def bias(self):
        return self.base.bias

    def delta_weight(self):
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale  # (out, r) @ (r, in) -> (out, in)

    @property
    def weight(self):
        """The effective weight, for code that reads `.weight` instead of calling the module."""
        if self.quantized:
            return self.base.dequantize() + self.delta_weight().to(self.base.compute_dtype)
        return self.base.weight if self.merged else self.base.weight + self.delta_weight()

    def forward(self, x):  # x: (..., in)
        y = self.base(x)  # (..., out)
        if self.merged:
            return y
        x = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls cast (once, to bf16) anyway
            x = x.to(self.lora_A.weight.dtype)
        h = self.lora_A(x)  # (..., r)
        return y + (self.lora_B(h) * self.scale).to(y.dtype)  # (..., out)

    def _dense_only(self, what):
        if self.quantized:
            raise ValueError(f"cannot {what} an adapter in place on 4-bit weights (it would re-quantise them); "
                             "merge_lora(model) writes a dense layer: dequantised base + delta")

    @torch.no_grad()
    def merge(self):
        self._dense_only("merge")
        if not self.merged:  # delta in fp32 at least, then cast once to the base dtype
            w = self.base.weight
            d = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scale
            w.copy_((w.float() + d).to(w.dtype))
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self):
        self._dense_only("unmerge")
        if self.merged:
            w = self.base.weight
            d = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scale
            w.copy_((w.float() - d).to(w.dtype))
            self.merged = False
        return self

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout_p}, merged={self.merged}"


def _names(x):
    return [s.strip() for s in x.split(",") if s.strip()] if isinstance(x, str) else list(x)


def _lora_root(model):
    """(module to put adapters in, its path prefix in model): the language model of a composite, else model."""
    lm = getattr(model, "language_model", None)
    return (lm, "language_model.") if isinstance(lm, nn.Module) else (model, "")


def _linears(root):
    """(path, layer) of every plain nn.Linear or Linear4bit, skipping those inside a LoRALinear (base, lora_A,
    lora_B)."""
    inside = set()
    for name, m in root.named_modules():
        if isinstance(m, LoRALinear):
            inside.update(f"{name}.{c}" for c in ("base", "lora_A", "lora_B"))
    return [(n, m) for n, m in root.named_modules() if type(m) in BASE_TYPES and n not in inside]


def _replace(root, path, new):
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def apply_lora(model, targets, r=8, alpha=16, dropout=0.0, use_rslora=False, train_modules=()):
    """Wrap the targeted Linears in LoRALinear, freeze everything else; returns a report dict (see format_report).

    targets: names of Linear modules (last part of the path), "q_proj,v_proj" or a list, or "all-linear"
    (every Linear but lm_head, as peft). train_modules: module names (last part or full path in model) whose
    parameters stay fully trainable, e.g. ("projector",) for LLaVA.
    """
    root, prefix = _lora_root(model)
    linears = _linears(root)
    if targets == "all-linear":
        chosen = [(n, m) for n, m in linears if n.rpartition(".")[2] != "lm_head"]
    else:
        want = set(_names(targets))
        have = {n.rpartition(".")[2] for n, _ in linears}
        missing = sorted(want - have)
        if missing:
            wrapped = sorted({n.rpartition(".")[2] for n, m in root.named_modules() if isinstance(m, LoRALinear)})
            raise ValueError(f"LoRA target(s) {missing} match no nn.Linear; Linear names here: {sorted(have)}"
                             + (f" (already wrapped in LoRALinear: {wrapped})" if wrapped else ""))
        chosen = [(n, m) for n, m in linears if n.rpartition(".")[2] in want]
    if not chosen:
        raise ValueError("no nn.Linear to wrap")
    for n, m in chosen:
        _replace(root, n, LoRALinear(m, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora))

    model.requires_grad_(False)
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in adapters:
        m.lora_A.requires_grad_(True)
        m.lora_B.requires_grad_(True)
    named = dict(model.named_modules())
    for t in _names(train_modules):
        hits = [m for n, m in named.items() if n and (n == t or n.rpartition(".")[2] == t)]
        if not hits:
            raise ValueError(f"train_modules entry {t!r} matches no module; top-level modules: "
                             f"{sorted(n for n in named if n and '.' not in n)}")
        for m in hits:
            m.requires_grad_(True)
    return lora_report(model, [prefix + n for n, _ in chosen])


def lora_report(model, wrapped=None):
    """Parameter counts, each parameter counted once (tied weights are one parameter)."""
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    adapter_ids = {id(p) for m in adapters for p in (m.lora_A.weight, m.lora_B.weight)}
    params = {id(p): p for p in model.parameters()}  # parameters() already dedupes; by id to be explicit
    adapter = sum(p.numel() for i, p in params.items() if i in adapter_ids)
    # a 4-bit weight is a buffer, not a parameter: counted as the weights it stands for
    base_4bit = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    total = sum(p.numel() for p in params.values()) + base_4bit
    first = adapters[0] if adapters else None
    return dict(base=total - adapter, base_4bit=base_4bit, adapter=adapter, total=total,
                trainable=sum(p.numel() for p in params.values() if p.requires_grad),
                n_wrapped=len(adapters), wrapped=wrapped if wrapped is not None else
                [n for n, m in model.named_modules() if isinstance(m, LoRALinear)],
                r=first.r if first else None, alpha=first.alpha if first else None)


def format_report(rep):
    names = sorted({w.rpartition(".")[2] for w in rep["wrapped"]})
    return (f"lora r={rep['r']} alpha={rep['alpha']} on {rep['n_wrapped']} Linears ({','.join(names)}): "
            f"base {rep['base']:,}" + (f" ({rep['base_4bit']:,} in 4 bits)" if rep.get("base_4bit") else "") +
            f" | adapter {rep['adapter']:,} | trainable {rep['trainable']:,} "
            f"({100 * rep['trainable'] / rep['total']:.3f}% of {rep['total']:,})")


def lora_state_dict(model, prefix="base_model.model."):
    """Only the adapter tensors, under peft's names: <prefix><module path>.lora_A.weight / .lora_B.weight."""
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"{prefix}{name}.lora_A.weight"] = m.lora_A.weight.detach()
            sd[f"{prefix}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return sd


def adapter_config(model, base_model_name_or_path=None):
    """peft's adapter_config.json fields for the adapters in model (read from the modules, so they cannot drift)."""
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not adapters:
        raise ValueError("model has no LoRALinear")
    m = adapters[0]
    if any((a.r, a.alpha, a.dropout_p, a.use_rslora) != (m.r, m.alpha, m.dropout_p, m.use_rslora) for a in adapters):
        raise ValueError("adapters differ in r / alpha / dropout / use_rslora: one adapter_config cannot describe them")
    names = sorted({n.rpartition(".")[2] for n, a in model.named_modules() if isinstance(a, LoRALinear)})
    return dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
                r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout_p, target_modules=names,
                use_rslora=m.use_rslora, bias="none", fan_in_fan_out=False, inference_mode=True)


def merge_lora(model):
    """Fold every adapter into its base weight and put a plain nn.Linear back; returns model. A 4-bit base
    becomes a dense Linear in its compute dtype holding dequantised base + delta (QLoRA's usual merge)."""
    paths = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for n in paths:
        m = model.get_submodule(n)
        if m.quantized:
            b = m.base
            dense = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, device=m.lora_A.weight.device,
                              dtype=b.compute_dtype)
            with torch.no_grad():
                dense.weight.copy_((b.dequantize().float() + m.delta_weight().float()).to(b.compute_dtype))
                if b.bias is not None:
                    dense.bias.copy_(b.bias)
            _replace(model, n, dense)
        else:
            _replace(model, n, m.merge().base)
    return model
