"""utils/runtime.py: the one schedule and the one compile-with-eager-fallback."""
import math

import pytest
import torch
import torch.nn as nn

from utils.runtime import CompiledBlocks, CompiledOrEager, warmup_cosine


def test_warmup_cosine_against_its_formula():
    assert [warmup_cosine(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for s in range(4, 25):
        t = min(1.0, (s - 4) / 16)
        assert warmup_cosine(s, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert warmup_cosine(10, 4, 20, 0.1, progress=0.5) == pytest.approx(0.55)   # time-based progress
    assert warmup_cosine(10, 4, 20, 0.1, progress=-1.0) == 1.0                   # clamped
    assert warmup_cosine(0, 0, 10) == 1.0                                        # no warm-up


def blocks_and_step():
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    x = torch.randn(2, 4)

    def step():
        y = x
        for b in blocks:
            y = torch.tanh(b(y))
        y.sum().backward()
        return y.detach()
    return blocks, step


def test_compiled_blocks_equal_eager_and_keep_parameter_names():
    blocks, step = blocks_and_step()
    want = step()
    names = [n for n, _ in blocks.named_parameters()]
    compiled = CompiledBlocks(blocks, backend="eager")
    assert "compiled" in compiled.warm_up(step)
    assert compiled.active and torch.allclose(compiled.run(step), want)
    assert [n for n, _ in blocks.named_parameters()] == names
    compiled.uncompile()
    assert not compiled.active and all("forward" not in b.__dict__ for b in blocks)


def test_compiled_blocks_pass_keyword_arguments():
    # Coeus's blocks take the shared RoPE tables as a keyword (rope=...): the compiled forward must accept it
    from models.coeus import Coeus, coeus_config
    torch.manual_seed(0)
    model = Coeus(coeus_config("tiny"))
    ids = torch.randint(0, 65, (2, 24))
    want = model(ids)
    compiled = CompiledBlocks(model.layers, backend="eager")
    assert torch.allclose(model(ids), want, atol=1e-6) and compiled.active


def test_compiled_blocks_compile_a_whole_method_as_one_target():
    # train_vqa --compile: the vision tower's features as one graph beside per-block decoders; uncompile restores it
    from models.vit import VisionTransformer, vision_config
    torch.manual_seed(0)
    tower = VisionTransformer(vision_config("tiny"))
    pixels = torch.randn(2, 3, tower.config.image_size, tower.config.image_size)
    want = tower.features(pixels)
    compiled = CompiledBlocks([], backend="eager", whole=[(tower, "features")])
    assert compiled.active and isinstance(tower.__dict__["features"], CompiledOrEager)
    assert torch.allclose(tower.features(pixels), want, atol=1e-6)
    compiled.uncompile()
    assert "features" not in tower.__dict__ and torch.allclose(tower.features(pixels), want, atol=1e-6)


def test_compiled_blocks_fall_back_to_eager_for_good(monkeypatch):
    blocks, step = blocks_and_step()
    want = step()
    calls = []

    def broken_compile(fn, **kw):
        def run(*a, **k):
            calls.append(1)
            raise RuntimeError("no working compiler here")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    compiled = CompiledBlocks(blocks, what="the toy blocks")
    with pytest.warns(UserWarning, match="torch.compile of the toy blocks failed"):
        assert compiled.warm_up(step).startswith("eager")
    assert torch.allclose(compiled.run(step), want) and len(calls) == 1   # never tried again
    f = CompiledOrEager(lambda t: t * 2, "f")
    with pytest.warns(UserWarning, match="torch.compile of f failed"):
        assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
    assert not f.is_compiled()


def test_disabled_blocks_just_run():
    blocks, step = blocks_and_step()
    compiled = CompiledBlocks(blocks, enabled=False)
    assert compiled.warm_up(step) == "eager" and not compiled.active
    assert all("forward" not in b.__dict__ for b in blocks)
