"""make_step's CUDA graphs without a compiler (utils.runtime.GraphedCalls): the step captured as it runs around the
fused decode kernels, and the prefill replayed per prompt shape. Off a GPU they run eagerly (checked here); on a
GPU the graph-replayed decoding must give the eager decoding's tokens."""
import pytest
import torch

from kernels.launch import triton_available
from models.llama import Llama, llama_config
from utils.decoding import Decoder, LlamaLM, decode_tokens, make_step, step_mode
from utils.runtime import GraphedCalls
from utils.sampling import SamplerConfig


def test_graphed_calls_run_eagerly_off_a_gpu():
    calls = []
    f = GraphedCalls(lambda x: calls.append(1) or x * 2, "f", eager_calls=1)
    for _ in range(3):
        assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
    assert len(calls) == 3 and f.captured() == 0


def test_auto_step_mode_is_graph_only_for_the_fused_layers_at_batch_1():
    dec = Decoder(LlamaLM(Llama(llama_config("tiny"))), SamplerConfig(temperature=0.0))
    assert step_mode(dec, "cpu") == "off" and step_mode(dec, "cuda") == "on"   # no fused kernels on this model
    dec.lm.layer_kernels = True
    assert step_mode(dec, "cuda") == "graph" and step_mode(dec, "cuda", batch=2) == "on"
    assert step_mode(dec, "cuda", "off") == "off"


def _decode(model_state, mode, prefill, sampler, prompt, n, runs=3):
    torch.manual_seed(0)
    model = Llama(llama_config("tiny")).to("cuda", torch.float16)
    model.load_state_dict(model_state)
    lm = LlamaLM(model, fuse=True, gemv=True)
    dec = Decoder(lm, sampler).to("cuda")
    dec.setup(1, prompt.shape[1] + n, "cuda")
    step = make_step(dec, "cuda", mode, prefill=prefill)
    outs = []
    for _ in range(runs):  # the first run eager, the later ones replayed (the prefill from its second run on)
        torch.manual_seed(1)
        outs.append(torch.cat(list(decode_tokens(dec, step, prompt, n)), 1))
    return outs, step, dec


@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs CUDA and Triton")
def test_graph_step_and_prefill_give_the_eager_tokens():
    torch.manual_seed(0)
    state = Llama(llama_config("tiny")).to(torch.float16).state_dict()
    prompt = torch.randint(0, 512, (1, 9), device="cuda")
    greedy = SamplerConfig(temperature=0.0)
    ref, _, _ = _decode(state, "off", "eager", greedy, prompt, 24)
    outs, step, dec = _decode(state, "graph", "graph", greedy, prompt, 24)
    assert dec.lm.layer_kernels and step.mode == "graph" and step.is_compiled()
    assert dec.lm_prefill.captured() == 1
    for o in outs:
        assert torch.equal(o, ref[0]), (o, ref[0])
    # a new set-up forgets the graphs (the cache may have moved) and captures again
    dec.setup(1, 40, "cuda")
    assert dec.lm_prefill.captured() == 0
    again = [torch.cat(list(decode_tokens(dec, step, prompt, 24)), 1) for _ in range(2)]
    assert all(torch.equal(o, ref[0]) for o in again) and dec.lm_prefill.captured() == 1
    # sampled: the graph draws fresh random numbers at every replay (not one frozen draw), same seed same tokens
    sampled = SamplerConfig(temperature=1.0, top_k=50, top_p=0.95)
    eager_s, _, _ = _decode(state, "off", "eager", sampled, prompt, 48, runs=1)
    graph_s, _, _ = _decode(state, "graph", "graph", sampled, prompt, 48, runs=3)
    assert len(set(graph_s[-1][0].tolist())) > 4
    assert torch.equal(graph_s[1], graph_s[2])  # replays of the same seed agree
    assert eager_s[0].shape == graph_s[-1].shape
