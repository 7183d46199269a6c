"""The long-sequence scripts on tiny sizes (CPU): they run, write their files, and their checks pass."""
import csv
import json

import pytest
import torch

import stress_test_massive
import test_infinite_context
from benchmarks import bench_gla_kernel
from tests.triton_interpreter import needs_triton, run_in_interpreter


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.mark.parametrize("mode", ["step", "prefill"])
def test_infinite_context_tiny(tmp_path, mode, capsys):
    test_infinite_context.main(["--config", "tiny", "--tokens", "256", "--check-tokens", "100", "--mode", mode,
                                "--segment", "32", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "infinite_context.json").read_text())
    assert all(res["checks"].values()) and res["logit_rel_err"] <= 1e-4
    out = capsys.readouterr().out
    assert "KV cache for 256 tokens" in out and "all checks passed" in out


def test_stress_sweep_tiny(tmp_path):
    # one subprocess per point on CPU; a training mode's row has its batch (budget // T) and tokens/s
    stress_test_massive.main(["--config", "tiny", "--lengths", "64", "--modes", "parallel,llama-train",
                              "--train-tokens", "200", "--repeats", "1", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "stress.csv")))
    assert [(r["mode"], r["T"], r["batch"], r["tokens"]) for r in rows] == [("parallel", "64", "1", "64"),
                                                                           ("llama-train", "64", "3", "192")]
    for r in rows:
        assert float(r["seconds"]) > 0 and float(r["peak_mib"]) > 0 and float(r["tokens_per_s"]) > 0
    assert (tmp_path / "stress.png").is_file()


def test_stress_versus_llama_ratios():
    # speed-up = Llama seconds / Coeus seconds, memory = Coeus peak / Llama peak, per length where both exist
    rows = [{"mode": "parallel", "T": 8, "seconds": 1.0, "peak_mib": 50.0},
            {"mode": "llama", "T": 8, "seconds": 3.0, "peak_mib": 100.0},
            {"mode": "train", "T": 8, "seconds": 2.0, "peak_mib": 10.0},
            {"mode": "llama-train", "T": 8, "seconds": "OOM", "peak_mib": "OOM"},
            {"mode": "parallel", "T": 16, "seconds": 1.0, "peak_mib": 1.0}]
    assert stress_test_massive.versus_llama(rows) == [{"T": 8, "what": "forward", "speedup": 3.0, "memory": 0.5}]


def test_stress_unknown_mode_is_an_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        stress_test_massive.main(["--config", "tiny", "--lengths", "64", "--modes", "parallel,nosuchmode",
                                  "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'nosuchmode'" in err and "valid: parallel, prefill, step, llama, train, llama-train" in err
    assert not (tmp_path / "stress.csv").exists()


def test_stress_point_in_process():
    args = stress_test_massive.parse_args(["--config", "tiny", "--repeats", "1", "--step-tokens", "5",
                                           "--train-tokens", "140"])
    for mode in stress_test_massive.MODES:
        row = stress_test_massive.measure(mode, 70, args, "cpu", torch.float32)
        assert row["seconds"] > 0 and row["tokens_per_s"] > 0, mode
        assert row["tokens"] == {"step": 5, "train": 140, "llama-train": 140}.get(mode, 70), mode


def test_stress_recompute_mixer_reaches_the_model_and_the_json(tmp_path):
    args = stress_test_massive.parse_args(["--config", "tiny", "--recompute-mixer", "branches"])
    model = stress_test_massive.build("train", args, "cpu", torch.float32)
    assert all(layer.mixer.cfg.recompute_mixer == "branches" for layer in model.layers)
    stress_test_massive.main(["--config", "tiny", "--lengths", "64", "--modes", "train", "--train-tokens", "128",
                              "--repeats", "1", "--recompute-mixer", "alternate", "--out", str(tmp_path)])
    assert json.load(open(tmp_path / "stress.json"))["recompute_mixer"] == "alternate"


def test_stress_gla_triton_flag_keeps_the_pytorch_form_off_cuda():
    args = stress_test_massive.parse_args(["--config", "tiny", "--gla", "triton"])
    model = stress_test_massive.build("parallel", args, "cpu", torch.float32)
    from models.gla import chunk_gla
    assert all(m.mixer.global_attn is chunk_gla for m in model.layers)  # kernels/gla.py only switches on CUDA


def test_stress_train_step_learns():
    # the timed training step really trains: repeated steps on one batch lower its loss
    args = stress_test_massive.parse_args(["--config", "tiny"])
    for mode in stress_test_massive.TRAIN_MODES:
        torch.manual_seed(0)
        model = stress_test_massive.build(mode, args, "cpu", torch.float32)
        ids = torch.randint(0, args.vocab_size, (2, 32))
        step = stress_test_massive.train_step_fn(model, ids, "cpu", torch.float32)
        before = model(ids, labels=ids)[1].item()
        for _ in range(3):
            step()
        assert model(ids, labels=ids)[1].item() < before, mode


def test_kernel_bench_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench", "--smoke", "--out", str(tmp_path)])
    bench_gla_kernel.main()
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["T"] for r in rows] == [256, 512] and all(r["ours_c64_ms"] > 0 and r["ours_c64_fwd_ms"] > 0 for r in rows)
    # labels come from the actual B x T (a T above the budget runs one row of T tokens, and says so)
    assert [r["label"] for r in rows] == ["4 x 256 = 1,024 tokens", "2 x 512 = 1,024 tokens"]
    assert all(r["tokens"] == r["B"] * r["T"] and 0 < r["floor_fwd_ms"] < r["floor_fwd_bwd_ms"] for r in rows)
    if bench_gla_kernel.load_fla()[2] == "fla not installed":
        assert all(r[c] == "fla not installed" for r in rows for c in ("fla_simple_fwd_ms", "fla_simple_ms"))


def test_kernel_bench_labels_and_floor():
    # 131,072 tokens at T = 128k with the default 65,536 budget: B = 1, and the label says so
    assert bench_gla_kernel.floor_bytes(2, 32768, 4, 64, 2) == (4 * 2 * 32768 * 256 * 2 + 2 * 32768 * 4 * 4,
                                                                8 * 2 * 32768 * 256 * 2 + 2 * 2 * 32768 * 4 * 4)
    args = bench_gla_kernel.parse_args([])
    assert max(1, args.tokens // 131072) == 1 and args.tokens == 65536


@needs_triton
def test_kernel_bench_times_the_lookback_forward_at_each_segment_cap():
    # the Triton columns in Triton's interpreter (they run wherever the kernels do); the GPU's segmentation forced
    # on this small input (64 programs wanted, segments of one chunk at least), so that the look-back forward
    # really chains segments: at most 2, then 4, a row
    out = run_in_interpreter("""
        import json, sys, tempfile
        import kernels.gla as G
        from benchmarks import bench_gla_kernel
        G._programs_wanted, G.MIN_SEG = (lambda device: 64), 1
        segments, launch = [], G._launch_fwd_lookback
        # (q, k, v, g, h0, o, scale, chunk_size, L, ...): T / chunk_size / L segments a row
        G._launch_fwd_lookback = lambda q, *a, **kw: segments.append(q.shape[2] // a[6] // a[7]) or launch(q, *a, **kw)
        d = tempfile.mkdtemp()
        sys.argv = ["bench", "--device", "cpu", "--dtype", "float32", "--lengths", "512", "--tokens", "1024",
                    "--iters", "1", "--warmup", "0", "--no-compile", "--no-sdpa", "--copy-mib", "16",
                    "--lookback-segments", "2,4", "--out", d]
        bench_gla_kernel.main()
        row = json.load(open(d + "/results.json"))["rows"][0]
        print(json.dumps(dict(row=row, segments=sorted(set(segments)))))
    """)
    r = json.loads(out.strip().splitlines()[-1])
    row = r["row"]
    # each cap took effect (2, 4); the forward + backward ran the default forward, the look-back one at the default
    # cap: the 8 one-chunk segments of 512 tokens
    assert r["segments"] == [2, 4, 8]
    for n in (2, 4):
        assert row[f"rel_err_o_lookback_s{n}_vs_triton"] < 1e-5 and row[f"triton_lookback_s{n}_fwd_ms"] > 0
    assert row["lookback_best_segments"] in (2, 4)
    assert row["triton_lookback_fwd_ms"] == row[f"triton_lookback_s{row['lookback_best_segments']}_fwd_ms"]
    assert row["triton_fwd_ms"] > 0 and row["triton_ms"] > 0
