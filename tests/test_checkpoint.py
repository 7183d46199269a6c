"""utils/checkpoint.py: one clear message for weights that do not fit, and the training-state schema that all
three scripts write and resume from (a round trip is exact; an older checkpoint without `train` still loads)."""
import pytest
import torch
import torch.nn as nn

from utils.checkpoint import (SCHEMA, load_train_state, load_weights, restore_train_state, rng_state,
                              save_train_state)


def small_model(width=4):
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, 2))


def test_load_weights_names_missing_unexpected_and_misshaped_keys():
    model = small_model()
    sd = small_model(width=5).state_dict()       # mis-shaped everywhere
    del sd["2.bias"]                             # missing
    sd["3.weight"] = torch.zeros(1)              # unexpected
    with pytest.raises(ValueError) as e:
        load_weights(model, sd, "ckpt.pt")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("ckpt.pt does not fit Sequential")
    assert "missing (1): 2.bias" in msg and "unexpected (1): 3.weight" in msg
    assert "0.weight (5, 3) vs (4, 3)" in msg
    good = small_model().state_dict()
    load_weights(model, good)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in good.items())


class Tok:
    def to_dict(self):
        return {"kind": "fake"}


def trained(model, opt, steps):
    for _ in range(steps):
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_train_state_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trained(model, opt, 3)
    path = tmp_path / "last.pt"
    save_train_state(path, model, opt, kind="toy", model_config={"width": 4}, tokenizer=Tok(), step=3,
                     args={"lr": 1e-2}, train={"best": 0.5}, meta={"template": {"system": "hi"}})
    want_next = torch.rand(3)  # what the RNG gives right after the save

    ckpt = load_train_state(path, kind="toy")
    assert set(SCHEMA) - {"rng_ranks"} <= set(ckpt) and ckpt["template"] == {"system": "hi"}
    assert ckpt["sharded_from"] is None and ckpt["tokenizer"] == {"kind": "fake"}
    model2 = small_model(); opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)  # noqa: E702
    torch.manual_seed(123)  # restore must put the RNG back
    assert restore_train_state(ckpt, model2, opt2) == {"best": 0.5}
    assert torch.equal(torch.rand(3), want_next)
    torch.manual_seed(5); trained(model, opt, 2)    # noqa: E702 - both continue identically
    torch.manual_seed(5); trained(model2, opt2, 2)  # noqa: E702
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_old_checkpoint_without_train_dict_and_clear_errors(tmp_path):
    model = small_model()
    old = {"kind": "toy", "model_config": {}, "model": model.state_dict(), "tokenizer": {}, "optimizer": None,
           "step": 7, "rng": rng_state(), "args": {}, "best_val": 1.25, "batch_gen": "state"}
    torch.save(old, tmp_path / "old.pt")
    ckpt = load_train_state(tmp_path / "old.pt", kind="toy")
    assert ckpt["train"] == {"best_val": 1.25, "batch_gen": "state"}
    assert restore_train_state(ckpt, small_model()) == ckpt["train"]
    with pytest.raises(ValueError, match="holds a 'toy' model, expected coeus"):
        load_train_state(tmp_path / "old.pt", kind="coeus")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_train_state(tmp_path / "nope.pt", kind="toy")
    (tmp_path / "sharded").mkdir()
    with pytest.raises(ValueError, match="needs --dist fsdp"):
        load_train_state(tmp_path / "sharded", kind="toy")
    with pytest.raises(FileNotFoundError, match="rank0.pt missing"):
        load_train_state(tmp_path / "sharded", kind="toy", dist_mode="fsdp")
    with pytest.raises(ValueError, match="missing"):
        restore_train_state(dict(ckpt, model={}), small_model(), source="old.pt")
