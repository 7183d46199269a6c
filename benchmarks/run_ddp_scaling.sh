#!/usr/bin/env bash
# DDP / FSDP2 scaling of the tinyllama-1.1b decoder: 1-GPU baseline, then N-GPU DDP and FSDP2 under torchrun,
# then an FSDP2 run resumed from the sharded checkpoint the FSDP2 run saved; JSON results + logs into OUT.
#   usage: benchmarks/run_ddp_scaling.sh OUT [extra bench_ddp_scaling.py flags, e.g. --smoke]
#   NPROC=2 (default) sets the GPUs per run; CKPT_DIR (default: a temp folder, deleted at the end) holds the
#   ~13 GB sharded checkpoint, kept out of OUT.
set -euo pipefail
OUT=${1:?usage: benchmarks/run_ddp_scaling.sh OUT [flags]}; shift
NPROC=${NPROC:-2}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
# the H200 machine must run without NVLink SHARP / multicast (see the device notes)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
TMP=$(mktemp -d "${CKPT_DIR:-${TMPDIR:-/tmp}}/ddp_scaling.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
BENCH=benchmarks/bench_ddp_scaling.py
TORCHRUN="python -m torch.distributed.run --standalone --nproc_per_node=$NPROC"

python $BENCH --dist none --out "$OUT/single.json" "$@" 2>&1 | tee "$OUT/single.log"
$TORCHRUN $BENCH --dist ddp --out "$OUT/ddp.json" "$@" 2>&1 | tee "$OUT/ddp.log"
$TORCHRUN $BENCH --dist fsdp --out "$OUT/fsdp.json" --save-ckpt "$TMP/fsdp_ckpt" "$@" 2>&1 | tee "$OUT/fsdp.log"
$TORCHRUN $BENCH --dist fsdp --resume "$TMP/fsdp_ckpt" --compare "$OUT/fsdp.json" --out "$OUT/fsdp_resume.json" "$@" \
    2>&1 | tee "$OUT/fsdp_resume.log"
python $BENCH --summarize "$OUT" 2>&1 | tee "$OUT/summary.txt"
