"""utils/distributed.py on CPU: 2 processes on the gloo backend (torchrun) against 1 process with the
doubled batch, for DDP and FSDP2; the sharded sampler; full and sharded (DCP) checkpoints.

The 2-process part is one torchrun launch of tests/dist_worker.py (module fixture), so the start-up
cost is paid once; the one-process references run here, in the test process.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import dist_worker as W  # noqa: E402
from torchrun_helper import torchrun  # noqa: E402
from utils import checkpoint as C  # noqa: E402
from utils import distributed as D  # noqa: E402



@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torchrun(os.path.join("tests", "dist_worker.py"), [out])
    return torch.load(out / "results.pt", weights_only=True), out


@pytest.fixture(scope="module")
def ref_accum():
    return W.reference(2 * W.MICRO_BS)  # one process, doubled micro-batch, same accumulation


def assert_close_list(a, b, tol):
    assert len(a) == len(b)
    diff = max(abs(x - y) for x, y in zip(a, b))
    assert diff <= tol, f"max diff {diff:.3g} > {tol}: {a} vs {b}"


# --- 2 processes vs 1 process with the doubled batch ------------------------------------------------
def test_ddp_two_procs_match_one_proc_doubled_batch(two_procs, ref_accum):
    res, _ = two_procs
    assert res["world_size"] == 2
    assert_close_list(res["ddp"], ref_accum[0], 1e-5)  # gradient accumulation with no_sync + act. ckpt
    assert_close_list(res["ddp_noaccum"], W.reference(2 * W.MICRO_BS, accum=1)[0], 1e-5)
    assert abs(res["ddp"][0] - res["ddp"][-1]) > 1e-3, "losses must move for the comparison to mean anything"
    assert res["ddp_full_ok"]
    # no_sync: with 2 micro-steps per optimizer step, gradients cross ranks once per step, not twice
    assert res["ddp_allreduces"] == res["ddp_noaccum_allreduces"] > 0


def test_fsdp2_two_procs_match_one_proc_doubled_batch(two_procs, ref_accum):
    res, _ = two_procs
    assert_close_list(res["fsdp"], ref_accum[0], 1e-5)
    assert_close_list(res["fsdp_fused_loss"], ref_accum[0], 1e-5)  # model.loss through FSDP2's hooks


def test_fsdp2_bf16_mixed_precision_with_activation_checkpointing_runs_close(two_procs, ref_accum):
    res, _ = two_procs
    # bf16 compute differs from fp32 by rounding only: close, but not equal (it really ran in bf16)
    assert_close_list(res["fsdp_bf16"], ref_accum[0], 2e-2)
    assert res["fsdp_bf16"] != res["fsdp"]


def test_dcp_sharded_save_resume_gives_identical_losses(two_procs):
    res, out = two_procs
    assert res["fsdp_resumed"] == res["fsdp"][-1:]  # fresh model + other init -> checkpoint -> same step
    assert res["extra_rank_ok"] == 1.0  # each rank got its own extra dict back
    assert os.path.isfile(out / "sharded" / ".metadata") and not os.path.exists(str(out / "sharded") + ".tmp")


def test_full_state_dict_loads_into_plain_single_process_model(two_procs, ref_accum):
    res, out = two_procs
    losses, ref_model, ref_opt = ref_accum
    full = torch.load(out / "full.pt", weights_only=True)
    model = W.build(seed=3)
    opt = W.make_optimizer(model)
    model.load_state_dict(full["model"])  # strict: the plain model's names, no "module." / sharding
    opt.load_state_dict(full["optimizer"])  # the plain optimizer layout
    # Adam divides by sqrt(v): a weight whose gradient is ~0 moves by up to lr on rounding noise alone,
    # so the weights agree to 1e-4 while the losses (below and above) agree to 1e-5
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0, msg=n)
    for i, s in ref_opt.state_dict()["state"].items():
        torch.testing.assert_close(opt.state_dict()["state"][i]["exp_avg"], s["exp_avg"], atol=1e-6, rtol=0)
    # ...and training goes on from it exactly as from the one-process run
    data = W.make_data()
    sampler = D.ShardedSampler(W.N_SAMPLES, rank=0, world_size=1, seed=7, shuffle=False)
    a = W.train(model, opt, sampler, data, 1, 4)
    b = W.train(ref_model, ref_opt, D.ShardedSampler(W.N_SAMPLES, rank=0, world_size=1, seed=7, shuffle=False),
                data, 1, 4)
    assert_close_list(a, b, 1e-5)
    # and it loads back into a fresh FSDP2 model on 2 ranks
    assert res["probe_loss_reloaded"] == res["probe_loss_trained"]


# --- sampler -------------------------------------------------------------------------------------------
def shards(n, world, **kw):
    return [D.ShardedSampler(n, rank=r, world_size=world, **kw) for r in range(world)]


@pytest.mark.parametrize("n,world", [(12, 2), (12, 3), (10, 4)])
def test_sampler_disjoint_and_covering(n, world):
    ss = shards(n, world, seed=1)
    parts = [list(s) for s in ss]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == len(ss[0])  # equal lengths: no DDP hang
    flat = [i for p in parts for i in p]
    assert set(flat) == set(range(n))
    assert len(flat) - len(set(flat)) == (-n) % world  # only the wrap-around padding repeats
    if n % world == 0:
        assert len(flat) == n


def test_sampler_drop_last_and_epochs():
    parts = [list(s) for s in shards(10, 4, seed=1, drop_last=True)]
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == 8
    s = D.ShardedSampler(50, rank=0, world_size=2, seed=1)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1 and sorted(e0) != sorted(range(25))  # reshuffled per epoch, and shuffled at all
    s2 = D.ShardedSampler(50, rank=0, world_size=2, seed=1)
    assert list(s2) == e0  # deterministic from seed + epoch


def test_sampler_exact_resume_mid_epoch():
    s = D.ShardedSampler(20, rank=1, world_size=2, seed=4)
    s.set_epoch(3)
    full = s.epoch_indices(3)
    it = iter(s)
    head = [next(it) for _ in range(4)]
    state = s.state_dict()
    s2 = D.ShardedSampler(20, rank=1, world_size=2, seed=4)
    s2.load_state_dict(state)
    s2.set_epoch(3)  # the usual loop call at the epoch's top must not reset a resumed epoch
    assert head + list(s2) == full
    s2.set_epoch(4)
    assert list(s2) == s2.epoch_indices(4)
    with pytest.raises(ValueError, match="world_size"):
        D.ShardedSampler(20, rank=0, world_size=4, seed=4).load_state_dict(state)


def test_shard_slice_partitions_a_global_batch():
    x = list(range(12))
    parts = [x[D.shard_slice(12, rank=r, world_size=3)] for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert x[D.shard_slice(12)] == x  # one process keeps it all
    with pytest.raises(ValueError, match="does not split"):
        D.shard_slice(10, rank=0, world_size=3)


# --- one process: every helper leaves behaviour unchanged ------------------------------------------
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_single_process_is_a_no_op(tmp_path):
    assert not D.is_distributed() and D.get_world_size() == 1 and D.is_main_process()
    info = D.init_distributed("cpu")
    assert info.world_size == 1 and not info.enabled
    model = W.build()
    assert D.wrap_model(model, "fsdp", block_types=(W.Block,)) is model
    assert D.rank0_only(lambda x: x + 1)(1) == 2
    assert float(D.all_reduce_mean(3.0)) == 3.0 and float(D.all_reduce_sum(torch.tensor([2.0]))) == 2.0
    opt = W.make_optimizer(model)
    with D.grad_sync(model, sync=False):
        model(W.make_data()[:2], labels=W.make_data()[:2])[1].backward()
    opt.step()
    msd, osd = C.gather_full_state_dict(model, opt)
    assert msd.keys() == model.state_dict().keys() and osd["param_groups"] == opt.state_dict()["param_groups"]
    # the sharded checkpoint also works in one process, and replaces an older one atomically
    folder = tmp_path / "ck"
    C.save_sharded(folder, model, opt, extra={"step": 1})
    C.save_sharded(folder, model, opt, extra={"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    model2 = W.build(seed=9)
    opt2 = W.make_optimizer(model2)
    assert C.load_sharded(folder, model2, opt2) == {"step": 2}
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(FileNotFoundError, match="not a sharded checkpoint"):
        C.load_sharded(tmp_path / "nope", model2, opt2)
