"""TinyLlama-shaped decoder against transformers' LlamaForCausalLM (random tiny weights, float32)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from models.hf_weights import hf_to_ours, llama_config_from_hf
from models.llama import Llama, llama_config


def make_pair(n_kv_heads=2, theta=10000.0, tied=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=n_kv_heads, vocab_size=256, max_position_embeddings=128,
                                   rope_parameters=dict(rope_type="default", rope_theta=theta),
                                   tie_word_embeddings=tied)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours = Llama(llama_config_from_hf(cfg.to_dict())).eval()
    ours.load_state_dict(hf_to_ours(ours, "llama", hf.state_dict()), strict=not tied)
    return hf, ours


@pytest.mark.parametrize("n_kv_heads,theta", [(4, 10000.0), (2, 10000.0), (1, 500.0)])
def test_logits_match_hf(n_kv_heads, theta):
    hf, ours = make_pair(n_kv_heads, theta)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-5


def test_padding_mask_matches_hf():
    hf, ours = make_pair()
    ids = torch.randint(0, 256, (3, 16))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0   # left padding
    mask[1, 11:] = 0  # right padding
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    keep = mask.bool()
    assert (got[keep] - ref[keep]).abs().max() <= 1e-5


def test_packed_segments_equal_separate_rows():
    _, ours = make_pair()
    a, b = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 9))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[1] * 7 + [2] * 9])
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        got = ours(packed, attention_mask=seg, position_ids=pos)
        ref = torch.cat([ours(a), ours(b)], 1)
    assert (got - ref).abs().max() <= 1e-5


def test_kv_cache_decode_equals_full_forward():
    hf, ours = make_pair()
    B, prompt, steps = 2, 8, 32
    ids = torch.randint(0, 256, (B, prompt + steps))
    with torch.no_grad():
        full = ours(ids)
        assert (full - hf(ids).logits).abs().max() <= 1e-5
        ours.setup_cache(B, max_len=64)
        out = [ours(ids[:, :prompt], input_pos=torch.arange(prompt))]
        for t in range(prompt, prompt + steps):
            out.append(ours(ids[:, t:t + 1], input_pos=torch.tensor([t])))
        ours.clear_cache()
    assert (torch.cat(out, 1) - full).abs().max() <= 1e-5


def test_gradient_checkpointing_gives_same_grads():
    _, ours = make_pair()
    ours.train()
    ids = torch.randint(0, 256, (2, 16))

    def grads():
        ours.zero_grad()
        _, loss = ours(ids, labels=ids)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in ours.parameters()]

    loss_a, ga = grads()
    ours.gradient_checkpointing = True
    loss_b, gb = grads()
    assert torch.equal(loss_a, loss_b)
    assert max((x - y).abs().max() for x, y in zip(ga, gb)) <= 1e-6


def test_loss_matches_hf():
    hf, ours = make_pair()
    ids = torch.randint(0, 256, (2, 16))
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        _, loss = ours(ids, labels=labels)
        assert abs(loss - hf(ids, labels=labels).loss) <= 1e-5


def test_tied_head_matches_hf():
    hf, ours = make_pair(tied=True)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-5


def test_bf16_autocast_and_bf16_weights_run():
    torch.manual_seed(0)
    m = Llama(llama_config("tiny"))
    ids = torch.randint(0, 512, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = m(ids, labels=ids)
    loss.backward()
    assert torch.isfinite(loss) and m.embed_tokens.weight.grad is not None
    with torch.no_grad():
        assert torch.isfinite(m.to(torch.bfloat16)(ids)).all()


def test_tinyllama_shape():
    with torch.device("meta"):
        m = Llama(llama_config("tinyllama-1.1b"))
    assert m.num_params() == 1_100_048_384  # TinyLlama-1.1B's published parameter count


@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_fused_linear_cross_entropy_matches_reference_float64(chunk):
    from models.llama import fused_linear_cross_entropy
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[::4] = -100
    ref = torch.nn.functional.cross_entropy(h @ w.T, t, ignore_index=-100)
    gh, gw = torch.autograd.grad(3 * ref, (h, w))
    got = fused_linear_cross_entropy(h, w, t, chunk_size=chunk)
    fh, fw = torch.autograd.grad(3 * got, (h, w))
    assert (got - ref).abs() <= 1e-12
    assert (fh - gh).abs().max() <= 1e-12 and (fw - gw).abs().max() <= 1e-12


def test_model_loss_equals_forward_loss_and_grads():
    _, ours = make_pair()
    ids = torch.randint(0, 256, (2, 16))
    labels = ids.clone()
    labels[0, :6] = -100
    _, ref = ours(ids, labels=labels)
    g_ref = torch.autograd.grad(ref, list(ours.parameters()))
    got = ours.loss(ids, labels, chunk_size=7)
    g_got = torch.autograd.grad(got, list(ours.parameters()))
    assert (got - ref).abs() <= 1e-6
    assert max((a - b).abs().max() for a, b in zip(g_ref, g_got)) <= 1e-6


def test_fused_projections_and_grouped_decode_attention_match():
    """fuse_projections() (inference) and the grouped-query cache path give the unfused model's logits."""
    from models.llama import Llama, LlamaConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
    ref = Llama(cfg).eval()
    fused = Llama(cfg).eval()
    fused.load_state_dict(ref.state_dict())
    fused.fuse_projections()
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        full = ref(ids)
        assert (fused(ids) - full).abs().max() < 1e-5
        fused.setup_cache(2, 40)
        steps = [fused(ids[:, :5], input_pos=torch.arange(5))]
        for t in range(5, 24):
            steps.append(fused(ids[:, t:t + 1], input_pos=torch.tensor([t])))
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_layer_inputs_then_the_layers_are_forward():
    """layer_inputs is forward's first half (what a caller running the layers its own way needs, e.g. the fused
    decode step of utils/decoding.py's LlamaLM): the Blocks on it, then norm and lm_head, give forward's logits."""
    torch.manual_seed(0)
    model = Llama(llama_config("tiny")).eval()
    ids = torch.randint(0, 512, (2, 9))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :3] = 0  # left padding in row 0
    with torch.no_grad():
        model.setup_cache(2, 40)
        ref = model(ids, attention_mask=mask, input_pos=torch.arange(9))
        x, cos, sin, m = model.layer_inputs(ids, attention_mask=mask, input_pos=torch.arange(9))
        assert x.shape == (2, 9, 64) and cos.shape == sin.shape == (2, 9, 16) and m.shape == (2, 1, 9, 40)
        for layer in model.layers:
            x = layer(x, cos, sin, m, torch.arange(9))
        assert torch.equal(model.lm_head(model.norm(x)), ref)
