#!/usr/bin/env bash
# Regenerate the committed embedded-scale tables under results/ from the shipped checkpoints:
# each sweep (resumable: a finished job is skipped), then its table. Usage, venv active:
#   bash scripts/regenerate_results.sh [TARGET ...]   (default: every target of `targets` below)
# Writes each step's wall time to outputs/sweeps/regenerate_times.tsv. Figures last:
#   python -m amrc_exp.report.figures --fig-dir results/figures
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("$@"); [ ${#targets[@]} -eq 0 ] && targets=(table1 table2 table3 table4 peers peers_seed1 peers_score8 peers_score16 peers_ratio16 peers_ratio32 peers_ratio32p128 peers_score32 peers_score64 frontier frontier_fm frontier_wf frontier_wf_kd frontier_full_ft fig2)
mkdir -p outputs/sweeps
times=outputs/sweeps/regenerate_times.tsv
for t in "${targets[@]}"; do
  start=$(date +%s); rc=0
  if [ "$t" = fig2 ]; then
    python -m amrc_exp.experiment.sensitivity -m --config-dir sweeps --config-name fig2_embedded || rc=$?
  elif [ "$t" = frontier ] || [ "$t" = frontier_fm ] || [ "$t" = frontier_wf ] || [ "$t" = frontier_wf_kd ]; then  # two sweeps (ours, dense PTQ), one table
    python -m amrc_exp -m --config-dir sweeps --config-name frontier_dense_embedded || rc=$?
    python -m amrc_exp -m --config-dir sweeps --config-name "${t}_embedded" \
      hydra/launcher=joblib hydra.launcher.n_jobs=2 || rc=$?
    [ "$rc" -le 2 ] && python -m amrc_exp.report.tables "outputs/sweeps/${t}_embedded" \
      outputs/sweeps/frontier_dense_embedded --out "results/${t}_embedded"
  else
    # rc 2: the sweep lists failed jobs (peers: the 3 `paper` jobs refused by design at -90%)
    python -m amrc_exp -m --config-dir sweeps --config-name "${t}_embedded" \
      hydra/launcher=joblib hydra.launcher.n_jobs=2 || rc=$?
    [ "$rc" -le 2 ] && python -m amrc_exp.report.tables "outputs/sweeps/${t}_embedded" --out "results/${t}_embedded"
  fi
  printf '%s\t%s s\trc %s\t%s\n' "$t" "$(( $(date +%s) - start ))" "$rc" "$(date -u +%FT%TZ)" | tee -a "$times"
done
