#!/bin/bash
# Wall time of `fraud status` with Triton down or not started, and of `fraud score` on a bad
# file (issue 14 targets: < 2 s each): the median of 5 runs of each command.
#   benchmarks/bench_commands.sh [RUNS_DIR]   RUNS_DIR: a runs folder with a registry (e.g. runs/
#                                            after `make run`); default: only an empty project
set -u
export MLFLOW_DISABLE_TELEMETRY=true
FRAUD="$(dirname "$0")/../.venv/bin/fraud"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
median() {
    local name=$1 times=() start end
    shift
    for _ in 1 2 3 4 5; do
        start=$(date +%s.%N); "$@" >/dev/null 2>&1; end=$(date +%s.%N)
        times+=("$(echo "$end - $start" | bc)")
    done
    printf "%-60s median %.2f s  (%s)\n" "$name" "$(printf "%s\n" "${times[@]}" | sort -n | sed -n 3p)" "${times[*]}"
}
printf 'User,Card,Year,Month,Day,Time,Amount,Use Chip,Merchant Name,Merchant City,Merchant State,Zip,MCC,Errors?,Is Fraud?\n0,0,2019,1,2,6h21,$1.00,Swipe Transaction,1,X,CA,1.0,5300,,No\n' > "$SCRATCH/bad.csv"
for runs in "$SCRATCH/empty" ${1:+"$1"}; do
    mkdir -p "$runs"
    echo "runs folder: $runs"
    export FRAUD_RUNS_DIR=$runs
    median "fraud status (no Triton running)" "$FRAUD" status
    median "fraud status --triton-url 127.0.0.1:9 (refused)" "$FRAUD" status --triton-url 127.0.0.1:9
    median "fraud status --triton-url 10.255.255.1:8000 (no answer)" "$FRAUD" status --triton-url 10.255.255.1:8000
    median "fraud score bad.csv (bad Time, line 2)" "$FRAUD" score "$SCRATCH/bad.csv"
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
