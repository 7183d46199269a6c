#!/usr/bin/env bash
# DDP / FSDP2 scaling of the tinyllama-1.1b decoder: 1-GPU baseline, then N-GPU DDP (buckets 100 MB and
# PyTorch's default 25 MB) and FSDP2 under torchrun, then an FSDP2 run resumed from the sharded checkpoint
# the FSDP2 run saved; JSON results + logs + summary.json into OUT. A failed run is reported and the others go on.
#   usage: benchmarks/run_ddp_scaling.sh OUT [extra bench_ddp_scaling.py flags, e.g. --smoke]
#   NPROC=2 (default) sets the GPUs per run; the ~13 GB sharded checkpoint goes to a temp folder under
#   CKPT_DIR (default $TMPDIR or /tmp), kept out of OUT and deleted at the end.
set -uo pipefail
OUT=${1:?usage: benchmarks/run_ddp_scaling.sh OUT [flags]}; shift
NPROC=${NPROC:-2}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
# the H200 machine must run without NVLink SHARP / multicast (see the device notes)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
TMP=$(mktemp -d "${CKPT_DIR:-${TMPDIR:-/tmp}}/ddp_scaling.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
BENCH=benchmarks/bench_ddp_scaling.py
TORCHRUN="python -m torch.distributed.run --standalone --nproc_per_node=$NPROC"
FAILED=()

step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, remember a failure
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || FAILED+=("$name")
}

step single       python $BENCH --dist none --out "$OUT/single.json" "$@"
step ddp          $TORCHRUN $BENCH --dist ddp --out "$OUT/ddp.json" "$@"
step ddp_bucket25 $TORCHRUN $BENCH --dist ddp --bucket-cap-mb 25 --out "$OUT/ddp_bucket25.json" "$@"
step fsdp         $TORCHRUN $BENCH --dist fsdp --save-ckpt "$TMP/fsdp_ckpt" --out "$OUT/fsdp.json" "$@"
step fsdp_resume  $TORCHRUN $BENCH --dist fsdp --resume "$TMP/fsdp_ckpt" --compare "$OUT/fsdp.json" \
                  --out "$OUT/fsdp_resume.json" "$@"
step summary      python $BENCH --summarize "$OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "FAILED: ${FAILED[*]} (see their logs in $OUT)"
    exit 1
fi
