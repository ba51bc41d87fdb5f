#!/usr/bin/env bash
# The CUDA path, checked on a GPU machine (CI has no GPU, so CI does not run this):
#   bash .ci/gpu_check.sh [LOGDIR]
# The demo (bf16 autocast, the default on CUDA), DPO and DPOP, float16 with the GradScaler,
# torch.compile, torchrun with nccl, and bench.py on a GPT-2-124M-shaped model for throughput and
# MFU. The test suite runs on the CPU alongside. Each part's log goes to LOGDIR/gpu_check.log;
# the tail of each is printed. Needs torch with CUDA, tiktoken, numpy, pytest; SYNTH names the
# folder of synth_prefs.py (default ../shared/bench).
set -u
PY=${PYTHON:-python3}
LOGDIR=${1:-/tmp/gpu_check}
SYNTH=${SYNTH:-../shared/bench}
RUNS=$(mktemp -d)
LOG=$LOGDIR/gpu_check.log
export PYTHONUNBUFFERED=1
mkdir -p "$LOGDIR"
: > "$LOG"

part() {  # part NAME COMMAND...: run it (3 minutes at most), log it, print its tail and time
  local name=$1; shift
  if (( SECONDS > 360 )); then echo "=== $name: skipped, out of time"; return; fi
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$LOG"
  timeout 180 "$@" > "$RUNS/$name.log" 2>&1
  local rc=$?
  cat "$RUNS/$name.log" >> "$LOG"
  grep -v "^step\|eta" "$RUNS/$name.log" | tail -n 14
  echo "--- $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), 'bf16', torch.cuda.is_bf16_supported())"
CUDA_VISIBLE_DEVICES= $PY -m pytest -q -x tests > "$RUNS/pytest.log" 2>&1 &
TESTS=$!

part demo_dpop $PY train.py --loss dpop --out "$RUNS/dpop"
part demo_dpo $PY train.py --loss dpo --out "$RUNS/dpo"
part fp16_dpop $PY train.py --loss dpop --dtype float16 --out "$RUNS/fp16"
part compile_dpop $PY train.py --loss dpop --compile --out "$RUNS/compile"
part share_prompt_dpop $PY train.py --loss dpop --share-prompt --out "$RUNS/share"
part torchrun_nccl torchrun --standalone --nproc_per_node=1 train.py --loss dpo --steps 100 --out "$RUNS/ddp"
for run in dpop dpo fp16 compile share ddp; do  # the last training row of each: skipped and overflow steps
  [ -f "$RUNS/$run/metrics.jsonl" ] && echo "$run: $(grep '"loss"' "$RUNS/$run/metrics.jsonl" | tail -n 1)"
done
# --share-prompt's packed rows against the two-row layout, GPT-2-124M shape, float32 and bf16
part share_prompt_logps env SYNTH="$SYNTH" $PY - <<'PYEOF'
import os, sys, torch
from contextlib import nullcontext
sys.path[:0] = [".", os.environ["SYNTH"]]
import synth_prefs
from data import collate
from extras.speedups import collate_shared, to_device
from model import GPT, GPTConfig
from train import pair_logps
torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)).cuda().eval()
raw = synth_prefs.make_pairs(32, seed=0, digits=2, shots=8)
pairs = [tuple(t[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")) for t in map(synth_prefs.tokenize_pair, raw)]
for name, ctx in (("float32", nullcontext()), ("bfloat16", torch.autocast("cuda", dtype=torch.bfloat16))):
    with torch.no_grad(), ctx:
        a = pair_logps(model, to_device(collate(pairs, 0), torch.device("cuda")))
        b = pair_logps(model, to_device(collate_shared(pairs, 0), torch.device("cuda")))
    diff = max((x - y).abs().max().item() for x, y in zip(a, b))
    print(f"{name}: max |two rows - packed| = {diff:.2e} on summed log-probs near {a[0].mean().item():.1f}")
PYEOF
B="$PY bench.py --device cuda --model gpt2 --batch 32 --shots 8 --steps 25 --warmup 5 --synth $SYNTH"
part bench_bf16 $B --dtype bfloat16
part bench_bf16_precompute $B --dtype bfloat16 --ref-logps precompute
part bench_bf16_compile $B --dtype bfloat16 --compile
part bench_bf16_share_prompt $B --dtype bfloat16 --share-prompt
part bench_fp16 $B --dtype float16
part bench_fp32_tf32 $B --dtype float32

wait $TESTS
echo "=== tests on the CPU (torch of this machine):"; tail -n 5 "$RUNS/pytest.log"
cat "$RUNS/pytest.log" >> "$LOG"
echo "total $SECONDS s"
