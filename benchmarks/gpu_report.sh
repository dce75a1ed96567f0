#!/usr/bin/env bash
# The one-call GPU report: everything this project measures only on a GPU, in one command of at most 8 minutes.
#
#   bash benchmarks/gpu_report.sh OUTDIR                      # on the lent GPU machine, from the repository root
#   bash benchmarks/gpu_report.sh --tar FILE.tgz OUTDIR       # also pack OUTDIR into one file
#   bash benchmarks/gpu_report.sh --dry-run OUTDIR            # here, without a GPU: the same stages, reduced
#
# Stages, in order, each under its own `timeout` (a stage that fails or hangs never stops the next):
#   machine     GPU, driver, torch/Triton/CUDA versions, commit (or a fingerprint of the tree) -> machine.json
#   install     pip install --no-deps --no-build-isolation --no-index -e .  (builds freeflow._C; never touches torch)
#   tune        benchmarks/tune_configs.py: every autotune config / launch setting of the kernels -> tune.{json,md}
#   step_B2     benchmarks/bench_step.py --size B/2 --largest-batch -> step_B2.{json,md}
#   step_XL2    the same at XL/2 -> step_XL2.{json,md}
#   selftest    python -m freeflow.kernels.selftest --json -> selftest.json
#   benchmarks  pytest benchmarks/ --benchmark-only (bench_step.py excluded) -> benchmarks.json
#   report      report.md (a table per stage) and summary.json (status, exit code, wall time per stage)
# Logs: OUTDIR/logs/<stage>.log. docs/performance.md says what each file holds and why the budgets are what they are.
#
# Time: the whole run ends within GPU_REPORT_TOTAL_S (default 465 s). Each stage gets its nominal budget plus
# what earlier stages left unused (at most twice its nominal), and never the time the later stages' nominal budgets
# need; stages with a --time-budget get their timeout minus a margin, so they end and write their files themselves.
# GPU_REPORT_<STAGE>_S (e.g. GPU_REPORT_TUNE_S=150) overrides a nominal budget; PYTHON overrides python3;
# GPU_REPORT_COMMIT names the commit when the tree has no .git (machine.json also hashes the sources).
set -u
ulimit -c 0 2>/dev/null  # a compiler that aborts must not leave gigabytes of core file behind

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; }
DRY=${GPU_REPORT_DRY_RUN:-0}
OUT=
TAR=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --tar) TAR=${2:?--tar needs a file}; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_report.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) OUT=$1 ;;
  esac
  shift
done
[ -n "$OUT" ] || { usage >&2; exit 2; }

cd "$(dirname "$0")/.." || exit 2  # the repository root
mkdir -p "$OUT/logs" || exit 2
OUT=$(cd "$OUT" && pwd)
case "$TAR" in ""|/*) ;; *) TAR="$PWD/$TAR" ;; esac
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
KILL_AFTER=5  # grace between a stage's SIGTERM/SIGINT and SIGKILL
declare -A GRACE=([benchmarks]=15)  # pytest wraps up after SIGINT: pytest-benchmark gathers machine info, writes JSON
grace() { echo "${GRACE[$1]:-$KILL_AFTER}"; }
START=$(date +%s.%N)
STAGES=(machine install tune step_B2 step_XL2 selftest benchmarks report)
if [ "$DRY" = 1 ]; then
  # The interpreter on tiny shapes: plumbing, not figures. bench_step gets a few seconds (its CPU run is not the
  # point: the stage's timeout and files are); the op benchmarks run one small reference benchmark.
  declare -A NOMINAL=([machine]=30 [install]=5 [tune]=120 [step_B2]=5 [step_XL2]=5 [selftest]=30 [benchmarks]=60
                      [report]=15)
else
  # Budgets, seconds (docs/performance.md, "Time budget"); with their graces they add up to 460 of the 465.
  # machine: nvidia-smi and one torch import. install: four translation units (three C++ against torch's headers,
  # one .cu) built in parallel by ninja, about a minute. tune: ~400 settings compiled by 15 workers (half its time
  # at most), then timed one by one; it runs first so that Triton's cache is warm for every later stage. step_*:
  # bench_step's own --time-budget (its largest-batch search) plus start-up; XL/2 is the figure of merit (four
  # variants, torch.compile among them), B/2 runs three. selftest: 12 checks, compiles cached.
  # benchmarks: last, stopped with SIGINT (pytest-benchmark still writes the JSON of what ran), the CPU-only and
  # the fp32-precision benchmarks last within it.
  TOTAL=${GPU_REPORT_TOTAL_S:-465}
  declare -A NOMINAL=([machine]=15 [install]=80 [tune]=100 [step_B2]=45 [step_XL2]=100 [selftest]=30 [benchmarks]=30
                      [report]=10)
fi
NEEDED=0
for s in "${STAGES[@]}"; do
  v="GPU_REPORT_${s^^}_S"
  [ -n "${!v:-}" ] && NOMINAL[$s]=${!v}
  NEEDED=$((NEEDED + NOMINAL[$s] + $(grace "$s")))
done
[ "$DRY" = 1 ] && TOTAL=${GPU_REPORT_TOTAL_S:-$((NEEDED + 10))}
[ "$NEEDED" -gt "$TOTAL" ] && echo "gpu_report.sh: the nominal budgets need ${NEEDED} s, more than the ${TOTAL} s" \
  "total: the last stages will be cut short" >&2
declare -A STATUS EXIT WALL LIMIT NOTE
for s in "${STAGES[@]}"; do STATUS[$s]=pending; done

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

json_str() {
  local s=$1
  s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/ }; s=${s//$'\t'/ }; s=${s//$'\r'/ }
  printf '"%s"' "$s"
}

write_summary() {
  local s sep=""
  {
    printf '{\n  "dry_run": %s,\n  "budget_s": %s,\n  "elapsed_s": %s,\n  "out": %s,\n  "stages": [\n' \
      "$([ "$DRY" = 1 ] && echo true || echo false)" "$TOTAL" "$(elapsed "$START")" "$(json_str "$OUT")"
    for s in "${STAGES[@]}"; do
      printf '%s    {"name": "%s", "status": "%s", "exit_code": %s, "wall_s": %s, "timeout_s": %s, "log": "%s", "note": %s}' \
        "$sep" "$s" "${STATUS[$s]}" "${EXIT[$s]:-null}" "${WALL[$s]:-null}" "${LIMIT[$s]:-null}" "logs/$s.log" \
        "$(json_str "${NOTE[$s]:-}")"
      sep=$',\n'
    done
    printf '\n  ]\n}\n'
  } >"$OUT/summary.json.tmp" && mv "$OUT/summary.json.tmp" "$OUT/summary.json"
}

# budget STAGE: sets T, the stage's timeout in whole seconds; returns 1 (and records the stage as skipped) when
# fewer than 5 s are left for it.
budget() {
  local stage=$1 later=0 s seen=0 left
  for s in "${STAGES[@]}"; do
    [ "$seen" = 1 ] && later=$((later + NOMINAL[$s] + $(grace "$s")))
    [ "$s" = "$stage" ] && seen=1
  done
  left=$(awk -v total="$TOTAL" -v start="$START" -v t="$(now)" -v later="$later" -v k="$(grace "$stage")" \
    'BEGIN { printf "%d", total - (t - start) - later - k }')
  T=$((2 * NOMINAL[$stage]))
  [ "$left" -lt "$T" ] && T=$left
  if [ "$T" -lt 5 ]; then
    STATUS[$stage]=skipped; NOTE[$stage]="no time left (${T} s)"; write_summary
    return 1
  fi
  return 0
}

# run STAGE SIGNAL CMD...: CMD under `timeout -s SIGNAL $T` (then KILL after its grace), output in the log.
run() {
  local stage=$1 sig=$2 t0 rc
  shift 2
  STATUS[$stage]=running; LIMIT[$stage]=$T; write_summary
  echo "== $stage (timeout ${T} s): $*" | tee -a "$OUT/logs/run.log"
  t0=$(now)
  timeout -s "$sig" --kill-after="$(grace "$stage")" "$T" "$@" >>"$OUT/logs/$stage.log" 2>&1
  rc=$?
  WALL[$stage]=$(elapsed "$t0"); EXIT[$stage]=$rc
  case $rc in
    0) STATUS[$stage]=ok ;;
    124|137) STATUS[$stage]=timeout ;;
    *) STATUS[$stage]=failed ;;
  esac
  echo "   $stage: ${STATUS[$stage]} (exit $rc, ${WALL[$stage]} s)" | tee -a "$OUT/logs/run.log"
  write_summary
  return 0
}

skip() { STATUS[$1]=skipped; NOTE[$1]=$2; write_summary; echo "== $1: skipped ($2)" | tee -a "$OUT/logs/run.log"; }
missing() { STATUS[$1]=missing; NOTE[$1]=$2; write_summary; echo "== $1: missing ($2)" | tee -a "$OUT/logs/run.log"; }
# seconds a stage with its own --time-budget may plan on: its timeout less start-up and writing (15 s, or T/3)
inner() { local m=15; [ $((T / 3)) -lt $m ] && m=$((T / 3)); echo $((T - m)); }

echo "gpu_report.sh: $OUT (dry run: $DRY, budget ${TOTAL} s), $(date -u +%FT%TZ)" | tee "$OUT/logs/run.log"
write_summary

# ---- machine ------------------------------------------------------------------------------------------------
if budget machine; then
  run machine TERM "$PY" - "$OUT/machine.json" <<'PY'
import glob, hashlib, json, os, platform, subprocess, sys, time

def sh(*cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return r.stdout.strip() if r.returncode == 0 else None
    except Exception:
        return None

info = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": sys.version.split()[0],
        "platform": platform.platform(), "cpu_count": os.cpu_count()}
smi = sh("nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,power.limit",
         "--format=csv,noheader")
if smi:
    keys = ["name", "driver", "memory", "compute_cap", "max_sm_clock", "power_limit"]
    info["nvidia_smi"] = [dict(zip(keys, (v.strip() for v in line.split(",")))) for line in smi.splitlines()]
nvcc = sh("nvcc", "--version")
info["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
# The device machine gets a copy of the working tree, maybe without .git: the caller can name the commit.
info["git_commit"] = sh("git", "rev-parse", "HEAD") or os.environ.get("GPU_REPORT_COMMIT")
info["commit_from"] = "git" if sh("git", "rev-parse", "HEAD") else "GPU_REPORT_COMMIT" if info["git_commit"] else None
status = sh("git", "status", "--porcelain", "--untracked-files=no")
info["git_dirty_files"] = None if status is None else len(status.splitlines())
info["git_subject"] = sh("git", "log", "-1", "--format=%cI %s")
# The tree that ran, whether or not .git came along: a hash of the sources that decide what is measured.
files = sorted(f for pattern in ("kernels/*.py", "csrc/*", "freeflow/**/*.py", "benchmarks/*.py", "benchmarks/*.sh",
                                 "setup.py", "pyproject.toml") for f in glob.glob(pattern, recursive=True)
               if os.path.isfile(f))
digest = hashlib.sha256()
for f in files:
    digest.update(f.encode() + b"\0")
    with open(f, "rb") as fh:
        digest.update(fh.read())
info["tree_sha256"] = digest.hexdigest()[:16]
info["env"] = {k: v for k, v in os.environ.items() if k.startswith(("FREEFLOW_", "TRITON_", "CUDA_VISIBLE", "TORCH_"))}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    sm_count=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
except Exception as e:
    info["torch_error"] = f"{type(e).__name__}: {e}"
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:
    info["triton_error"] = f"{type(e).__name__}: {e}"
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=1)
print(json.dumps(info, indent=1))
PY
fi

# ---- install ------------------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  skip install "dry run"
elif budget install; then
  # --no-deps: torch is the machine's own and is never reinstalled; --no-index: nothing is downloaded
  # then load the prebuilt extension (no JIT build) and check that its CUDA kernels are in
  run install TERM bash -c '"$1" -m pip install --no-deps --no-build-isolation --no-index -e . && "$1" -c "
from freeflow import _ext
ok = _ext.load(allow_jit=False)
print(\"freeflow._C:\", _ext.STATE.source, \"CUDA kernels:\", _ext.STATE.cuda, _ext.STATE.reason)
raise SystemExit(0 if ok and _ext.STATE.cuda else 1)"' _ "$PY"
  [ "${STATUS[install]}" = ok ] || NOTE[install]="the extension JIT-builds on first use instead (freeflow/_ext.py)"
fi

# ---- tune ---------------------------------------------------------------------------------------------------
if budget tune; then
  if [ "$DRY" = 1 ]; then
    # head dim 72 (its split path), one kernel of each kind, and a precompile worker
    run tune TERM env TRITON_INTERPRET=1 "$PY" benchmarks/tune_configs.py --tiny --sizes XL/2 --dtypes fp32 --jobs 1 \
      --cases attn_fwd attn_bwd_dkdv adaln_seam_bwd gelu_jvp --time-budget "$(inner)" --json "$OUT/tune.json" \
      --markdown "$OUT/tune.md"
  else
    run tune TERM "$PY" benchmarks/tune_configs.py --time-budget "$(inner)" --json "$OUT/tune.json" \
      --markdown "$OUT/tune.md"
  fi
fi

# ---- whole training step ------------------------------------------------------------------------------------
for size in B/2 XL/2; do
  stage=step_${size//\//}
  if [ ! -f benchmarks/bench_step.py ]; then
    missing "$stage" "benchmarks/bench_step.py does not exist in this tree"
  elif budget "$stage"; then
    variants=(toolkit plain toolkit_compiled reference compiled)
    [ "$size" = B/2 ] && variants=(toolkit plain reference)
    run "$stage" TERM "$PY" benchmarks/bench_step.py --size "$size" --variants "${variants[@]}" --largest-batch \
      --time-budget "$(inner)" \
      --json "$OUT/$stage.json" --markdown "$OUT/$stage.md"
  fi
done

# ---- self-test ----------------------------------------------------------------------------------------------
if budget selftest; then
  run selftest TERM "$PY" -m freeflow.kernels.selftest --json "$OUT/selftest.json"
  [ "${EXIT[selftest]}" = 2 ] && NOTE[selftest]="no CUDA device"
fi

# ---- op benchmarks ------------------------------------------------------------------------------------------
if budget benchmarks; then
  files=()
  last=()
  for f in benchmarks/bench_*.py; do
    case "$f" in
      benchmarks/bench_step.py) ;;                                            # its own stages above
      benchmarks/bench_attention.py|benchmarks/bench_forward_jvp.py) last+=("$f") ;;  # fp32 precision sweep; CPU only
      *) files+=("$f") ;;
    esac
  done
  extra=()
  [ "$DRY" = 1 ] && files=(benchmarks/bench_gelu.py) last=() extra=(-k reference)
  # SIGINT: pytest stops like on Ctrl-C and pytest-benchmark still writes the JSON of the benchmarks that ran
  run benchmarks INT "$PY" -m pytest ${files[@]+"${files[@]}"} ${last[@]+"${last[@]}"} --benchmark-only \
    --benchmark-json "$OUT/benchmarks.json" -s -p no:cacheprovider ${extra[@]+"${extra[@]}"}
fi

# ---- report -------------------------------------------------------------------------------------------------
if budget report; then
  NOTE[report]="report.md"
  run report TERM "$PY" - "$OUT" <<'PY'
import json, os, sys

out = sys.argv[1]
DETAILS = "<!-- per-config tables -->"  # tune_configs.DETAILS_MARK


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception:
        return None


def text(name):
    try:
        with open(os.path.join(out, name)) as f:
            return f.read()
    except Exception:
        return None


def table(head, rows):
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows])


def ms(v):
    return "-" if v is None else f"{v:.3f}"


def cell(v):
    return "-" if v is None or v == "" else v


summary, machine = load("summary.json") or {"stages": []}, load("machine.json") or {}
stages = {s["name"]: s for s in summary["stages"]}
md = ["# GPU report", ""]
smi = (machine.get("nvidia_smi") or [{}])[0]
md += [table(["GPU", "driver", "torch", "CUDA", "Triton", "python", "commit", "tree sha256", "date (UTC)"],
             [[machine.get("gpu", smi.get("name", "none")), smi.get("driver", "-"), machine.get("torch", "-"),
               machine.get("torch_cuda", "-"), machine.get("triton", "-"), machine.get("python", "-"),
               (machine.get("git_commit") or "unknown")[:12]
               + (f" (+{machine['git_dirty_files']} changed)" if machine.get("git_dirty_files") else ""),
               machine.get("tree_sha256", "-"), machine.get("date_utc", "-")]]), ""]
md += ["## Stages", "", table(["stage", "status", "exit", "wall s", "timeout s", "note"],
                              [[cell(s[k]) for k in ("name", "status", "exit_code", "wall_s", "timeout_s", "note")]
                               for s in summary["stages"] if s["name"] != "report"]), ""]

inst = stages.get("install", {})
if inst.get("status") not in (None, "ok", "skipped", "pending"):
    log = (text("logs/install.log") or "").splitlines()[-15:]
    md += ["## install", "", "```", *log, "```", ""]

for stage, title in (("step_B2", "Whole training step, DiT-B/2"), ("step_XL2", "Whole training step, DiT-XL/2")):
    body = text(f"{stage}.md")
    md += [f"## {title}", "", body.strip() if body else f"(no {stage}.md: {stages.get(stage, {}).get('status')})", ""]

st = load("selftest.json")
md += ["## Self-test (`python -m freeflow.kernels.selftest`)", ""]
if st and st.get("rows"):
    rows = []
    for r in st["rows"]:
        times = "; ".join(f"{t['what']} {ms(t['ms'])} vs {t['baseline']} {ms(t['baseline_ms'])} ({t['speedup']:.2f}×)"
                          for t in r.get("times", []))
        worst = r.get("worst") or {}
        rows.append([r["model"], r["dtype"], r["op"], "yes" if r["ok"] else "**NO**",
                     f"{worst['error']:.1e} ({worst['what']})" if worst else r.get("error", "-")[:120], times])
    md += [f"{st.get('device', '')}, batch {st['batch']}, {st['tokens']} tokens; status {st['status']}", "",
           table(["model", "dtype", "op", "ok", "worst error", "times (ms)"], rows), ""]
else:
    md += [f"(no rows: {st.get('status') if st else 'no selftest.json'})", ""]

bench = load("benchmarks.json")
md += ["## Op benchmarks (`pytest benchmarks/ --benchmark-only`)", ""]
if bench and bench.get("benchmarks"):
    rows = []
    for b in bench["benchmarks"]:
        x = b.get("extra_info", {})
        gpu = {k: v for k, v in x.items() if k.endswith("_ms")}
        saved = x.get("saved_activation_bytes")
        rows.append([b["fullname"].split("/")[-1], ms(x.get("gpu_ms")), ms(b["stats"]["median"] * 1e3),
                     f"{x['triton_launches']} + {x['aten_launches']}" if "triton_launches" in x else "-",
                     f"{saved / 2**20:.1f}" if saved is not None else "-",
                     "; ".join(f"{k[:-3]} {ms(v)}" for k, v in gpu.items() if k != "gpu_ms")])
    md += [table(["benchmark", "GPU ms (do_bench)", "median ms (wall)", "launches Triton + ATen", "saved MiB",
                  "other GPU ms"], rows), ""]
else:
    md += [f"(no benchmarks.json: {stages.get('benchmarks', {}).get('status')})", ""]

tune = text("tune.md")
md += [tune.split(DETAILS)[0].strip() + "\n\nPer-config tables: tune.md." if tune
       else f"## Launch settings (tune)\n\n(no tune.md: {stages.get('tune', {}).get('status')})", ""]
with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(md))
print("\n".join(md))
PY
fi

write_summary
if [ -n "$TAR" ]; then
  tar czf "$TAR" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "packed: $TAR"
fi
[ -f "$OUT/report.md" ] && cat "$OUT/report.md"
# last, for a caller that sees only the end of the output: one line per stage
echo
for s in "${STAGES[@]}"; do
  printf '%-10s %-8s exit %-4s %6s s of %s\n' "$s" "${STATUS[$s]}" "${EXIT[$s]:--}" "${WALL[$s]:--}" "${LIMIT[$s]:--}"
done
echo "gpu_report.sh: done in $(elapsed "$START") s; $OUT/report.md, $OUT/summary.json"
exit 0
