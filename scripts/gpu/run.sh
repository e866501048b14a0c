#!/usr/bin/env bash
# Runs on the GPU machine (one device call) after scripts/gpu/build.sh here:
#   scripts/gpu/run.sh check   correctness: PEFT fixtures + random models vs the CPU backend +
#                              device sampling vs the host's, then a compute-sanitizer memcheck
#                              pass of the quick check
#   scripts/gpu/run.sh bench   the Llama-3.1-8B-shape benchmark, then the PEFT peer
#   scripts/gpu/run.sh serve   the server binary on the GPU against the CPU (serve_check.py)
#   scripts/gpu/run.sh serve-bench  the server binary under concurrent HTTP load: Llama-3.1-8B
#                              from its preset name with 64 dummy rank-16 adapters (serve_bench.py)
#   scripts/gpu/run.sh smollm2 the default model with the example adapters on the GPU against
#                              PEFT (smollm2_check.py), after model-parts.sh stashed the model
#   scripts/gpu/run.sh profile ncu per-kernel summary of eager decode steps
#   scripts/gpu/run.sh slot-loads  adapter slot loads, synchronous and overlapped, alone and
#                              during decode steps; first loads with reused pinned buffers
#   scripts/gpu/run.sh ncu-lora    ncu memory, occupancy and warp-state sections of the eight LoRA
#                              kernels of one eager decode step (batch 64, 64 rank-16 adapters)
#   scripts/gpu/run.sh prefill     2k-token prefill with flash and with GEMM attention, and the
#                              cuBLAS rate (bench_gpu --prefill-only)
#   scripts/gpu/run.sh profile-prefill  ncu per-kernel summary of one 2k-token prefill with an adapter
#   scripts/gpu/run.sh ncu-flash   ncu sections of one flash prefill attention kernel
#   scripts/gpu/run.sh ncu-attention  ncu sections of one decode attention kernel (eager steps,
#                              batch 64 then batch 1, base model, 131-key contexts)
#   scripts/gpu/run.sh ncu-stalls  ncu instruction counts and stall reasons (cycles per issued
#                              instruction) of one decode attention kernel (batch 64, base) and
#                              one LoRA expand kernel (batch 64, 64 rank-16 adapters)
#   scripts/gpu/run.sh compare     csgmv + graphs decode with the LoRA kernels on CUDA cores and on tensor cores
#                              (bench_gpu --compare, see there; batches from
#                              LORAPLANE_BENCH_BATCHES, default 1,8,64)
#   scripts/gpu/run.sh gemms       bf16 GEMMs at decode shapes in cuBLAS and in decode_gemm.cu:
#                              time and weight GB/s (`gemms --variants`: also cuBLAS with beta 1,
#                              and split over k)
#   scripts/gpu/run.sh compare-gemms  csgmv + graphs decode with the projections in cuBLAS and in
#                              decode_gemm.cu (bench_gpu --compare-gemms; batches from
#                              LORAPLANE_BENCH_BATCHES, default 1,8,64)
#   scripts/gpu/run.sh attention   decode at 128-, 1000- and 4000-token contexts with the decode
#                              attention on CUDA cores and on tensor cores (bench_gpu
#                              --compare-attention); first with bench_gpu_base when
#                              scripts/gpu/build-baseline.sh made one
#   scripts/gpu/run.sh ab      csgmv + graphs decode rows (bench_gpu --decode-only; batches from
#                              LORAPLANE_BENCH_BATCHES, default 1,8,64) of bench_gpu_base (see
#                              scripts/gpu/build-baseline.sh) and of this build, twice in turn
#   scripts/gpu/run.sh parts   the whole decode step against its graph replayed alone (the host's
#                              part of a step; bench_gpu --step-parts, configurations from
#                              LORAPLANE_PARTS) for bench_gpu_base when built and this build,
#                              twice in turn
#   scripts/gpu/run.sh variants  bench_gpu --step-parts (LORAPLANE_PARTS) once per set of kernel
#                              compiler options in LORAPLANE_VARIANTS (';'-separated, e.g.
#                              "-DLMMA_SHRINK_MIN=1;" for the old shrink bound and today's
#                              sources), twice in turn, with each set's kernel registers
#   scripts/gpu/run.sh pdl     the same decode rows with decode graphs of ordinary edges and with
#                              programmatic ones (bench_gpu --compare-pdl), twice in turn
#   scripts/gpu/run.sh timeline  kernel trace (CUPTI, trace/build-trace.sh) of decode graph replays
#                              (LORAPLANE_PARTS, default batch 64 base, with one rank-16 or rank-64
#                              adapter, with 64 rank-16): busy and idle time per step, mean kernel
#                              durations (timeline.py)
#   scripts/gpu/run.sh all     check, serve and bench
# Logs go to $OUT (or ./gpu-logs); the last lines printed are the summary tables.
set -uo pipefail
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export PATH=/usr/local/cuda/bin:$PATH
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
BIN=target/release/examples
what=${1:-all}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
rc=0
if [[ $what == check || $what == all ]]; then
  "$BIN/gpu_check" 2>&1 | tee "$OUT/check.log"; rc=$((rc | PIPESTATUS[0]))
  if command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/gpu_check" --quick >"$OUT/memcheck.log" 2>&1
    s=$?; echo "compute-sanitizer memcheck (gpu_check --quick): exit $s, $(grep -c 'Invalid' "$OUT/memcheck.log") invalid accesses"
    tail -3 "$OUT/memcheck.log"; rc=$((rc | s))
  else
    echo "compute-sanitizer not found"
  fi
fi
if [[ $what == serve || $what == all ]]; then
  python3 scripts/gpu/serve_check.py target/release/loraplane-server 2>&1 | tee "$OUT/serve.log"; rc=$((rc | PIPESTATUS[0]))
fi
if [[ $what == serve-bench ]]; then
  python3 scripts/gpu/serve_bench.py target/release/loraplane-server 2>&1 | tee "$OUT/serve-bench.log"; rc=$((rc | PIPESTATUS[0]))
fi
if [[ $what == smollm2 ]]; then
  scripts/gpu/model-parts.sh join && python3 scripts/gpu/smollm2_check.py target/release/loraplane-server \
    models/SmolLM2-135M-Instruct.Q4_1.gguf 2>&1 | tee "$OUT/smollm2.log"; rc=$((rc | PIPESTATUS[0]))
fi
if [[ $what == profile ]]; then
  # Per-kernel durations of one eager decode step for each BATCH:ADAPTERS pair in
  # LORAPLANE_PROFILE (default: batch 1 base, batch 1 with one adapter, batch 64 with 64).
  for cfg in ${LORAPLANE_PROFILE:-1:0 1:1 64:64}; do
    echo "== profile: batch ${cfg%%:*}, ${cfg##*:} distinct rank-16 adapters (first ${LORAPLANE_PROFILE_KERNELS:-60} kernels)"
    LORAPLANE_PROFILE_BS=${cfg%%:*} LORAPLANE_PROFILE_ADAPTERS=${cfg##*:} \
      ncu --profile-from-start off --clock-control none --cache-control none --metrics gpu__time_duration.sum \
      --launch-count ${LORAPLANE_PROFILE_KERNELS:-60} --csv --page raw "$BIN/bench_gpu" --profile \
      >"$OUT/ncu-${cfg/:/-}.csv" 2>"$OUT/ncu-${cfg/:/-}.err"; rc=$((rc | $?))
    python3 - "$OUT/ncu-${cfg/:/-}.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))][1:]
t = collections.defaultdict(float); n = collections.Counter()
for r in rows:
    k = r["Kernel Name"][:60]; t[k] += float(r["gpu__time_duration.sum"].replace(",", "")); n[k] += 1
for k, v in sorted(t.items(), key=lambda x: -x[1]):
    print(f"{v/1e3:9.1f} us  {n[k]:3d}x  {v/1e3/n[k]:7.1f} us each  {k}")
PY
  done
fi
if [[ $what == profile-prefill ]]; then
  # Per-kernel durations of one 2k-token prefill with a rank-16 adapter, summed by kernel name.
  ncu --profile-from-start off --clock-control none --cache-control none --metrics gpu__time_duration.sum \
    --csv --page raw "$BIN/bench_gpu" --profile-prefill >"$OUT/ncu-prefill.csv" 2>"$OUT/ncu-prefill.err"
  rc=$((rc | $?))
  python3 - "$OUT/ncu-prefill.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))][1:]
t = collections.defaultdict(float); n = collections.Counter()
for r in rows:
    k = r["Kernel Name"][:70] + " " + r.get("Grid Size", ""); t[k] += float(r["gpu__time_duration.sum"].replace(",", "")); n[k] += 1
print(f"{sum(t.values())/1e3:9.1f} us in {len(rows)} kernels")
for k, v in sorted(t.items(), key=lambda x: -x[1])[:40]:
    print(f"{v/1e3:9.1f} us  {n[k]:4d}x  {v/1e3/n[k]:8.1f} us each  {k}")
PY
fi
if [[ $what == ncu-flash ]]; then
  # ncu sections of the first layer's flash prefill kernel (2k tokens, Llama-3.1-8B shape).
  ncu --profile-from-start off --clock-control none --kernel-name regex:flash_attention --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
    "$BIN/bench_gpu" --profile-prefill >"$OUT/ncu-flash.txt" 2>&1; rc=$((rc | $?))
  grep -E "Duration|Throughput|Pipe|Registers|Occupancy|Eligible|Issued|Stall|stall|Bank|L1|L2|DRAM" "$OUT/ncu-flash.txt" | head -60
fi
if [[ $what == ncu-attention ]]; then
  for bs in 64 1; do
    LORAPLANE_PROFILE_BS=$bs LORAPLANE_PROFILE_ADAPTERS=0 ncu --profile-from-start off --clock-control none \
      --kernel-name regex:attention --launch-skip 3 --launch-count 1 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats "$BIN/bench_gpu" --profile >"$OUT/ncu-attention-$bs.txt" 2>&1; rc=$((rc | $?))
    echo "== batch $bs"
    grep -E "Duration|Memory Throughput|Compute \(SM\)|Registers Per|Achieved Occupancy|Active Warps Per|Eligible Warps|Issued Warp|No Eligible" \
      "$OUT/ncu-attention-$bs.txt"
  done
fi
if [[ $what == ncu-lora ]]; then
  LORAPLANE_PROFILE_BS=64 LORAPLANE_PROFILE_ADAPTERS=64 ncu --profile-from-start off --clock-control none \
    --kernel-name regex:lora --launch-count 8 --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
    "$BIN/bench_gpu" --profile >"$OUT/ncu-lora.txt" 2>&1; rc=$((rc | $?))
  grep -E "lora_|Duration|Memory Throughput|Registers Per|Achieved Occupancy|Eligible Warps" "$OUT/ncu-lora.txt"
fi
if [[ $what == ncu-stalls ]]; then
  mets=smsp__inst_executed.sum,smsp__cycles_active.avg
  for s in long_scoreboard wait barrier short_scoreboard mio_throttle math_pipe_throttle selected not_selected \
    no_instruction branch_resolving imc_miss dispatch_stall lg_throttle; do
    mets=$mets,smsp__average_warps_issue_stalled_${s}_per_issue_active.ratio
  done
  for cfg in 0:decode_attention 64:lora_expand; do
    echo "== ${cfg#*:} (batch 64, ${cfg%%:*} distinct rank-16 adapters)"
    LORAPLANE_PROFILE_BS=64 LORAPLANE_PROFILE_ADAPTERS=${cfg%%:*} ncu --profile-from-start off --clock-control none \
      --kernel-name regex:${cfg#*:} --launch-skip 3 --launch-count 1 --metrics $mets "$BIN/bench_gpu" --profile \
      >"$OUT/ncu-stalls-${cfg#*:}.txt" 2>&1; rc=$((rc | $?))
    grep -E "smsp__" "$OUT/ncu-stalls-${cfg#*:}.txt"
  done
fi
if [[ $what == prefill ]]; then
  "$BIN/bench_gpu" --prefill-only 2>"$OUT/prefill.err" | tee "$OUT/prefill.log"; rc=$((rc | PIPESTATUS[0]))
  tail -5 "$OUT/prefill.err"
fi
if [[ $what == compare ]]; then
  LORAPLANE_BENCH_BATCHES=${LORAPLANE_BENCH_BATCHES:-1,8,64} "$BIN/bench_gpu" --compare 2>"$OUT/compare.err" \
    >"$OUT/compare.log"; rc=$((rc | $?))
  grep '^|' "$OUT/compare.log"; tail -5 "$OUT/compare.err"
fi
if [[ $what == ab ]]; then
  for round in 1 2; do
    for bin in bench_gpu_base bench_gpu; do
      echo "== $bin, round $round"
      LORAPLANE_BENCH_BATCHES=${LORAPLANE_BENCH_BATCHES:-1,8,64} "$BIN/$bin" --decode-only \
        2>"$OUT/ab-$bin-$round.err" >"$OUT/ab-$bin-$round.log"; rc=$((rc | $?))
      grep '^| decode csgmv' "$OUT/ab-$bin-$round.log"; tail -2 "$OUT/ab-$bin-$round.err"
    done
  done
fi
if [[ $what == parts ]]; then
  for round in 1 2; do
    for bin in bench_gpu_base bench_gpu; do
      [[ -x $BIN/$bin ]] || continue
      echo "== $bin, round $round"
      "$BIN/$bin" --step-parts 2>"$OUT/parts-$bin-$round.err" >"$OUT/parts-$bin-$round.log"; rc=$((rc | $?))
      grep '^| bs' "$OUT/parts-$bin-$round.log"; tail -2 "$OUT/parts-$bin-$round.err"
    done
  done
fi
if [[ $what == variants ]]; then
  # bench_gpu --step-parts once per set of NVRTC options in LORAPLANE_VARIANTS (';'-separated,
  # an empty entry for the sources' defaults), e.g. "-DLMMA_SHRINK_MIN=1;" against today's
  # shrink bound; then each set again in the same order. The kernels' registers and spills
  # under each set first.
  IFS=';' read -ra variants <<<"${LORAPLANE_VARIANTS:-}"
  [[ ${LORAPLANE_VARIANTS:-} == *';' || ${#variants[@]} -eq 0 ]] && variants+=("")
  for round in 1 2; do
    for i in "${!variants[@]}"; do
      opts=${variants[$i]}
      echo "== options '$opts', round $round"
      log="$OUT/variant-$i-$round"
      [[ $round == 1 ]] && LORAPLANE_NVRTC_OPTIONS=$opts "$BIN/bench_gpu" --registers 2>&1 \
        | grep -E '^kernel (lora_(shrink|expand|expand_store)_mma|decode_attention)_bf16' | tee "$log.registers"
      LORAPLANE_NVRTC_OPTIONS=$opts "$BIN/bench_gpu" --step-parts 2>"$log.err" >"$log.log"; rc=$((rc | $?))
      grep '^| bs' "$log.log"; tail -1 "$log.err"
    done
  done
fi
if [[ $what == timeline ]]; then
  # Every kernel of bench_gpu --step-parts through a CUPTI injection library (graph nodes one by
  # one; build it here with scripts/gpu/trace/build-trace.sh and carry scripts/gpu/trace/*.so*),
  # then per-step main/side stream times and mean kernel durations per configuration.
  parts=${LORAPLANE_PARTS:-64:0:16 64:1:16 64:1:64 64:64:16}
  CUDA_INJECTION64_PATH=$PWD/scripts/gpu/trace/libkernel_trace.so LORAPLANE_TRACE_OUT=/tmp/kernel-trace.txt \
    LORAPLANE_PARTS=$parts "$BIN/bench_gpu" --step-parts >"$OUT/timeline-run.log" 2>&1; rc=$((rc | $?))
  grep '^| bs' "$OUT/timeline-run.log"; tail -3 "$OUT/timeline-run.log" | grep -v '^|'
  python3 scripts/gpu/timeline.py /tmp/kernel-trace.txt $parts 2>&1 | tee "$OUT/timeline.txt"
fi
if [[ $what == pdl ]]; then
  LORAPLANE_BENCH_BATCHES=${LORAPLANE_BENCH_BATCHES:-1,8,64} "$BIN/bench_gpu" --compare-pdl 2>"$OUT/pdl.err" \
    >"$OUT/pdl.log"; rc=$((rc | $?))
  grep '^| decode csgmv' "$OUT/pdl.log"; grep 'programmatic edges' "$OUT/pdl.err"; tail -2 "$OUT/pdl.err"
fi
if [[ $what == attention ]]; then
  if [[ -x $BIN/bench_gpu_base ]]; then
    echo "== baseline (bench_gpu_base, see scripts/gpu/build-baseline.sh)"
    "$BIN/bench_gpu_base" --compare-attention 2>"$OUT/attention-base.err" >"$OUT/attention-base.log"; rc=$((rc | $?))
    grep '^|' "$OUT/attention-base.log"; tail -3 "$OUT/attention-base.err"
    echo "== this build"
  fi
  "$BIN/bench_gpu" --compare-attention 2>"$OUT/attention.err" >"$OUT/attention.log"; rc=$((rc | $?))
  grep '^|' "$OUT/attention.log"; tail -3 "$OUT/attention.err"
fi
if [[ $what == compare-gemms ]]; then
  LORAPLANE_BENCH_BATCHES=${LORAPLANE_BENCH_BATCHES:-1,8,64} "$BIN/bench_gpu" --compare-gemms 2>"$OUT/compare-gemms.err" \
    | tee "$OUT/compare-gemms.log" | grep '^|'; rc=$((rc | PIPESTATUS[0]))
  tail -3 "$OUT/compare-gemms.err"
fi
if [[ $what == gemms ]]; then
  "$BIN/bench_gpu" --gemms "${@:2}" 2>"$OUT/gemms.err" | tee "$OUT/gemms.log"; rc=$((rc | PIPESTATUS[0]))
fi
if [[ $what == slot-loads ]]; then
  "$BIN/bench_gpu" --slot-loads 2>"$OUT/slot-loads.err" | tee "$OUT/slot-loads.log"; rc=$((rc | PIPESTATUS[0]))
  tail -5 "$OUT/slot-loads.err"
fi
if [[ $what == bench || $what == all || $what == quick-bench ]]; then
  flag=""; [[ $what == quick-bench ]] && flag=--quick
  "$BIN/bench_gpu" $flag 2>"$OUT/bench.err" | tee "$OUT/bench.log"; rc=$((rc | PIPESTATUS[0]))
  tail -5 "$OUT/bench.err"
  if [[ $what != quick-bench ]]; then
    PYTHONUNBUFFERED=1 timeout 300 python3 scripts/gpu/peft_peer.py 2>&1 | tee "$OUT/peft.log"
  fi
fi
exit $rc
