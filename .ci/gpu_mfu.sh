#!/usr/bin/env bash
# MFU of GPT-2-124M-shaped DPO steps at realistic row lengths, on a GPU machine (issue 18; CI has
# no GPU, so CI does not run this):
#   bash .ci/gpu_mfu.sh [LOGDIR]
# bench.py --device cuda --model gpt2 --dtype bfloat16 with prompts of 508 and 1016 tokens (rows of
# about 512 and 1024 tokens; --share-prompt's packed rows stay within GPT-2's 1024 positions), for
# a few configurations, each at growing micro-batches until the first failure (out of memory, say:
# a larger batch would fail too). One JSON line per run, or per failure, goes to LOGDIR/mfu.jsonl;
# a Markdown table follows, then a torch.profiler table of 3 steps of the non-compiled run with the
# best MFU in LOGDIR/profile.txt (its head printed); every run's output goes to LOGDIR/runs.log.
# Made to fit one 10-minute command: a run starts only while more than 30 s are left before
# DEADLINE seconds (default 400), each is stopped at DEADLINE, and what is left is skipped and
# listed; the profile adds 75 s at most. SYNTH names the folder of synth_prefs.py (default
# ../shared/bench); PYTHON the python (default python3).
set -u
PY=${PYTHON:-python3}
LOGDIR=${1:-/tmp/gpu_mfu}
SYNTH=${SYNTH:-../shared/bench}
DEADLINE=${DEADLINE:-400}
PROMPT_TOKENS=${PROMPT_TOKENS:-"508 1016"}
JSONL=$LOGDIR/mfu.jsonl
RUNS=$(mktemp -d)
BENCH="$PY bench.py --device cuda --model gpt2 --dtype bfloat16 --synth $SYNTH"
export PYTHONUNBUFFERED=1
mkdir -p "$LOGDIR"
: > "$JSONL"
: > "$LOGDIR/runs.log"
SKIPPED=""

sweep() {  # sweep CONFIG LIMIT "BATCHES" FLAGS...: each prompt length at each batch, until one fails
  local config=$1 limit=$2 batches=$3; shift 3
  local n b log rc why
  for n in $PROMPT_TOKENS; do
    for b in $batches; do
      if (( SECONDS > DEADLINE - 30 )); then SKIPPED="$SKIPPED $config/$n/$b"; continue; fi
      (( limit > DEADLINE - SECONDS )) && limit=$((DEADLINE - SECONDS))
      log=$RUNS/$config-$n-$b
      echo "=== $config, prompts of $n tokens, batch $b (at $SECONDS s, $limit s at most)"
      timeout "$limit" $BENCH --prompt-tokens "$n" --batch "$b" "$@" > "$log.out" 2> "$log.err"
      rc=$?
      { echo "=== $config $n $b: exit $rc"; cat "$log.out" "$log.err"; } >> "$LOGDIR/runs.log"
      if (( rc == 0 )) && tail -n 1 "$log.out" | grep -q '^{'; then
        tail -n 1 "$log.out" | sed "s/^{/{\"config\": \"$config\", /" >> "$JSONL"
        grep -o '"steady_tokens_per_s": [0-9.]*\|"peak_gpu_mem_mib": [0-9]*\|"fraction_of_matmul_peak": [0-9.]*' "$log.out" | paste -sd ' '
        continue
      fi
      if grep -q "OutOfMemoryError\|out of memory" "$log.err"; then why="out of memory"
      elif (( rc == 124 )); then why="timeout after $limit s"
      else why="exit $rc"; fi
      echo "{\"config\": \"$config\", \"prompt_tokens\": $n, \"batch\": $b, \"failed\": \"$why\"}" >> "$JSONL"
      echo "failed: $why"; [ "$why" = "out of memory" ] || tail -n 5 "$log.err"
      break  # the larger batches of this length would fail too
    done
  done
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1

# In order of what the issue needs most, since the last ones are the first skipped when time runs
# out. precompute: the policy alone, the reference's log-probs computed before the timed steps.
# every-step: train.py's default, the reference's forward in each step. compile: two shapes of row
# are compiled (the second marks the length dynamic), hence a longer limit and 3 warm-up steps.
sweep precompute 90 "16 32 64 128" --ref-logps precompute --steps 8 --warmup 2
sweep every-step 90 "32 64" --steps 8 --warmup 2
PROMPT_TOKENS=1016 sweep compile+precompute 200 "32" --compile --ref-logps precompute --steps 10 --warmup 3
sweep share+precompute 90 "32 64 128" --share-prompt --ref-logps precompute --steps 8 --warmup 2
sweep share+every-step 90 "64" --share-prompt --steps 8 --warmup 2
[ -n "$SKIPPED" ] && echo "skipped, out of time (config/prompt tokens/batch):$SKIPPED"

echo "=== results ($JSONL)"
$PY - "$JSONL" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
done = [r for r in rows if "failed" not in r]
if done:
    print(f"{done[0]['gpu']}, measured bf16 matmul {done[0]['matmul_gflops'] / 1000:.0f} TFLOP/s; "
          f"MFU: model FLOPs of the work the loss needs, per second, against that")
print("| config | batch | row tokens | tokens/s | ms/step | peak GiB | MFU |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    if "failed" in r:
        print(f"| {r['config']} | {r['batch']} | ~{r['prompt_tokens'] + 5} | {r['failed']} | | | |")
    else:
        print(f"| {r['config']} | {r['batch']} | {r['seq_len_mean']:.0f} | {r['steady_tokens_per_s']:,.0f} "
              f"| {1000 * r['steady_step_s_median']:.0f} | {r['peak_gpu_mem_mib'] / 1024:.1f} "
              f"| {r['fraction_of_matmul_peak']:.1%} |")
PYEOF

# The profile: the non-compiled run with the best MFU, else 1024-token rows at batch 16
BEST=$($PY - "$JSONL" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
rows = [r for r in rows if "failed" not in r and not r["compile"]]
if rows:
    r = max(rows, key=lambda r: r["fraction_of_matmul_peak"])
    print(f"--prompt-tokens {r['prompt_tokens']} --batch {r['batch']} --ref-logps {r['ref_logps']}"
          + " --share-prompt" * r["share_prompt"])
PYEOF
)
BEST=${BEST:-"--prompt-tokens 1016 --batch 16 --ref-logps precompute"}
echo "=== profile: $BEST (at $SECONDS s)"
timeout 75 $BENCH $BEST --steps 5 --warmup 2 --profile "$LOGDIR/profile.txt" > "$RUNS/profile" 2>&1
rc=$?
{ echo "=== profile: exit $rc"; cat "$RUNS/profile"; } >> "$LOGDIR/runs.log"
(( rc == 0 )) && head -n 40 "$LOGDIR/profile.txt" || { echo "profile: exit $rc"; tail -n 5 "$RUNS/profile"; }
echo "total $SECONDS s"
