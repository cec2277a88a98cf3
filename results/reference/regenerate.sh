#!/usr/bin/env bash
# Regenerate the reference results of the claims (results/reference/) with one command.
#
#   results/reference/regenerate.sh                 # every part: digits fashion stacked mixtures
#   results/reference/regenerate.sh digits fashion  # only these parts (run the rest later)
#   results/reference/regenerate.sh --gpu           # the larger claims-*-gpu suites (see below)
#
# Resumable: the runs are trained in a work tree ($GENBENCH_REFERENCE_WORK, default
# results/reference-work), which keeps each run's model.pt, so a second call (or a call after Ctrl-C)
# skips every finished run and resumes an interrupted one from its checkpoint. After the runs, the
# files a report needs (metrics.json, config.json, curves.csv, train_log.csv, samples.png) are copied
# into results/reference/<suite>/<dataset>/<card>/seed<k>/ - never model.pt, checkpoints, leases or
# the feature cache - and the report is rebuilt there (genbench report --results-dir
# results/reference). The committed tree therefore holds no weights: `genbench eval --run` works on
# the work tree's runs, not on results/reference's.
#
# Last, the claims over the new tree are compared with results/reference/verdicts.json (the verdicts
# the README states); a change is printed, and `results/reference/verdicts.py --write` records it.
#
# Measured on a 2-core CPU (two runs at once, one thread each): see the suites' descriptions and
# results/reference/README.md for the per-suite and total wall times.
#
# Environment: GENBENCH (the genbench command; default .venv/bin/genbench, else genbench on PATH),
# GENBENCH_JOBS (runs at once; default 2), GENBENCH_REFERENCE_WORK (the work tree),
# GENBENCH_DATA_ROOT (passed as --data-root when set), GENBENCH_DEVICE (default auto).
set -euo pipefail

# The whole script is one function, read in full before it starts, so editing this file while a
# regeneration runs cannot change the running one.
main() {
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    cd "$ROOT"


    if [[ -n "${GENBENCH:-}" ]]; then
        GB=$GENBENCH
    elif [[ -x "$ROOT/.venv/bin/genbench" ]]; then
        GB="$ROOT/.venv/bin/genbench"
    else
        GB=genbench
    fi
    PY=$(dirname "$(command -v "$GB")")/python
    [[ -x "$PY" ]] || PY=python3
    JOBS=${GENBENCH_JOBS:-2}

    GPU=0
    PARTS=()
    for a in "$@"; do
        case "$a" in
            --gpu) GPU=1 ;;
            -h|--help) sed -n '2,27p' "$ROOT/results/reference/regenerate.sh"; exit 0 ;;
            mixtures|stacked|digits|fashion) PARTS+=("$a") ;;
            *) echo "regenerate.sh: unknown part '$a' (parts: mixtures stacked digits fashion; --gpu)" >&2; exit 2 ;;
        esac
    done
    [[ ${#PARTS[@]} -gt 0 ]] || PARTS=(digits fashion stacked mixtures)

    if [[ $GPU == 1 ]]; then
        SUFFIX=-gpu
        WORK=${GENBENCH_REFERENCE_WORK:-results/reference-gpu-work}
        OUT=results/reference-gpu
    else
        SUFFIX=
        WORK=${GENBENCH_REFERENCE_WORK:-results/reference-work}
        OUT=results/reference
    fi

    EXTRA=(--device "${GENBENCH_DEVICE:-auto}" --no-progress)
    [[ -n "${GENBENCH_DATA_ROOT:-}" ]] && EXTRA+=(--data-root "$GENBENCH_DATA_ROOT")

    # On digits the cards that are cheap to train get 5 seeds, the others the suite's 3 (the suite says so).
    CHEAP_CARDS=vae,dcgan,sngan,wgan-gp,vqvae-pixelcnn

    run_suite() {   # suite, then extra genbench-run arguments
        local suite=$1; shift
        echo "== $(date '+%F %T') genbench run --suite suites/$suite.yaml $*"
        # a failed run (exit 1) does not stop the other suites; the script exits 1 at the end
        "$GB" run --suite "suites/$suite.yaml" --results-dir "$WORK" --jobs "$JOBS" "${EXTRA[@]}" "$@" ||
            FAILED+=("$suite $*")
    }
    FAILED=()

    start=$(date +%s)
    for part in "${PARTS[@]}"; do
        t0=$(date +%s)
        case "$part" in
            mixtures) run_suite "claims-mixtures$SUFFIX" ;;
            stacked)  run_suite "claims-stacked$SUFFIX" ;;
            digits)   run_suite "claims-digits$SUFFIX"
                      run_suite "claims-digits$SUFFIX" --only "$CHEAP_CARDS" --seeds 5 ;;
            fashion)  run_suite "claims-fashion$SUFFIX" ;;   # 32x32: no run is cheap here, 3 seeds each
        esac
        echo "== $part: $(( $(date +%s) - t0 )) s"
    done
    echo "== runs: $(( $(date +%s) - start )) s in all"

    # Export the records (no weights) into $OUT and rebuild the report there.
    "$PY" - "$WORK" "$OUT" <<'EOF'
import shutil, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
KEEP = ("metrics.json", "config.json", "curves.csv", "train_log.csv", "samples.png")
suites = sorted(p.name for p in work.iterdir() if p.is_dir() and not p.name.startswith(".")) if work.is_dir() else []
n = 0
for suite in suites:
    dest_suite = out / suite
    if dest_suite.is_dir():
        shutil.rmtree(dest_suite)           # runs dropped from a suite do not linger
    for rec in sorted((work / suite).rglob("metrics.json")):
        rel = rec.parent.relative_to(work)
        if any(part.startswith(".") for part in rel.parts):   # .replaced-* folders, caches
            continue
        dest = out / rel
        dest.mkdir(parents=True, exist_ok=True)
        for name in KEEP:
            if (rec.parent / name).is_file():
                shutil.copy2(rec.parent / name, dest / name)
        n += 1
print(f"== exported {n} runs of {len(suites)} suite(s) from {work} into {out} (no model.pt)")
EOF
    "$GB" report --results-dir "$OUT"
    echo "== report: $OUT/report.md, $OUT/report.html"

    if [[ $GPU == 0 ]]; then
        "$PY" results/reference/verdicts.py --check --results-dir "$OUT" || {
            echo "== the verdicts differ from results/reference/verdicts.json (above); if the new runs are right," \
                 "record them with: $PY results/reference/verdicts.py --write, and update the README table" >&2
            exit 1
        }
    fi
    if [[ ${#FAILED[@]} -gt 0 ]]; then
        printf '== a run failed in: %s; run this script again to retry (finished runs are kept)\n' "${FAILED[@]}" >&2
        exit 1
    fi
    echo "== done in $(( $(date +%s) - start )) s"
}

main "$@"
exit $?
