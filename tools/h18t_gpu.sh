#!/usr/bin/env bash
# Issue 18 item 4 (helper h18t), one device call, no wheel parts: `sd35trt bench --configs text`
# on Large real shapes with random weights: the peer (transformers BF16 eager CLIP-L + CLIP-G +
# T5-XXL) and the torch-fp8 backend's own text path (T5 FP8 GEMMs from T5's calibration, T5 + CLIPs
# compiled; also eager, and the previous weight-only T5) in interleaved rounds, one process.
#   OUT=... [TINY=<tiny checkpoint folder: its tokenizers tokenize calib_prompts/>] bash tools/h18t_gpu.sh
# Without TINY the prompts are seeded random token ids. Then, with TINY and time left of the wall cap
# H18T_WALL_S (195 s), tools/h18t_smoke.py: the backend through Pipeline on the tiny checkpoint
# (compile=True / eager / compile + memory='low', text encoders only). Writes $OUT/h18t_text.json
# (the bench rows), $OUT/h18t_smoke.json and $OUT/h18t.log; prints the table at the end.
# H18T_LIMIT_S (default 150 s) bounds the bench (its first calls and cosines are saved before the rounds).
# H18T_TINY=1: the same on the CPU at tiny widths (`--tiny`: the check of this script, no figures).
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
cd "$(dirname "$0")/.."
tok=()
if [ -n "${TINY:-}" ]; then tok=(--tokenizers "$(realpath "$TINY")"); fi  # gpu_run.sh runs from /tmp
if [ -n "${H18T_TINY:-}" ]; then tok+=(--tiny); export OMP_NUM_THREADS=1; fi
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used,temperature.gpu --format=csv || true
  timeout -k 5 "${H18T_LIMIT_S:-150}" bash tools/gpu_run.sh bench --configs text "${tok[@]}" --json "$out/h18t.json"
  echo "bench rc=$? at ${SECONDS}s"
  left=$(( ${H18T_WALL_S:-195} - SECONDS ))  # the smoke gets what the bench left of the wall cap
  if [ -n "${TINY:-}" ] && [ "$left" -gt 20 ]; then
    timeout -k 5 "$left" bash tools/gpu_run.sh tools/h18t_smoke.py "$(realpath "$TINY")" "$out/h18t_smoke.json" \
      "$([ -n "${H18T_TINY:-}" ] && echo cpu || echo cuda)"
    echo "smoke rc=$? at ${SECONDS}s"
  else
    echo "smoke skipped (TINY unset or ${left}s left)"
  fi
  python3 - "$out/h18t_text.json" "$out/h18t_smoke.json" <<'PY'
import json, sys
try:
    for r in json.load(open(sys.argv[2])):
        print(f"smoke {r['name']:<36} {r['t5_precision']} compiled={r['compiled_text']} cos={r['cos_vs_bf16']} "
              f"first={r['first_call_s']}s")
except (OSError, ValueError):
    print("smoke: no rows")
try:
    rows = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    sys.exit(f"no rows: {exc}")
print(f"{'h18t text encoders (one CFG pair)':<62} {'ms':>7} {'time/peer':>9} {'compile s':>9} {'ctx cos':>8} {'T5 cos':>8}")
for r in rows:
    if "partial" in r:  # the bench stopped before its timed rounds
        print(f"{r['name']:<62} untimed, first call {r['first_call_s']} s, cos {r['held_out_cos']} T5 {r['t5_part_cos']}")
        continue
    t5 = f"{min(r['t5_part_cos']):.6f}" if "t5_part_cos" in r else ""
    print(f"{r['name']:<62} {r['step_ms']:>7.2f} {r['time_vs_peer']:>8.3f}x {r.get('compile_s', ''):>9} "
          f"{r.get('cos_vs_bf16', ''):>8} {t5:>8}")
PY
} 2>&1 | grep --line-buffered -v "prompt truncated\|indexing errors" | tee "$out/h18t.log"
