"""benchmarks/bench_qlora.py --smoke: the whole path on tiny configs on the CPU, ours and peft + bitsandbytes."""
import json

import pytest

from benchmarks import bench_qlora


def test_smoke_runs_both_sides(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "q.json"
    bench_qlora.main(["--smoke", "--variants", "ours-qlora,peft-qlora", "--out", str(out)])
    r = json.loads(out.read_text())
    for v in ("ours-qlora", "peft-qlora"):
        assert "error" not in r[v], r[v]
        assert r[v]["samples_per_s"] > 0 and len(r[v]["losses"]) == 3
    # same configuration, same random batch: both start near ln(vocab) and the first steps agree roughly
    assert abs(r["ours-qlora"]["losses"][0] - r["peft-qlora"]["losses"][0]) < 0.1
    assert r["ours-qlora"]["trainable"] == r["peft-qlora"]["trainable"]  # adapters + projector, nothing else
    assert "qlora_speedup" in r


def test_unknown_variant_is_an_argument_error():
    with pytest.raises(SystemExit):
        bench_qlora.parse_args(["--variants", "ours-qlora,nope"])
