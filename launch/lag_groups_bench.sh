#!/usr/bin/env bash
# LAG on one process against LAG across process groups: the same selection (lag-select's LAG@8 at the Handbook's
# base, 4 -> 8 layers, 6 candidates x 8 steps, scored on 4 held-out micro-batches) run by `nanogrow lag` as
#   1p1t  one process, one torch thread
#   1p2t  one process, two torch threads
#   2g    torchrun --nproc_per_node=2, lag.groups=2 (two groups of one process, one thread each)
# in alternated rounds, at the same global batch (16 sequences: one process accumulates 2 micro-batches) and the same
# held-out sequences (lag.score_batches counts micro-batches per rank: 4 on each of 2 ranks is 8 on one). Prints,
# per run, the winner, its held-out loss and the selection's wall-clock (all of it but the winner's own steps, as
# the run records it) and the whole command's.
usage() {
  cat <<'TXT'
usage: launch/lag_groups_bench.sh [--rounds N] [--data DIR] [--out DIR]
  --rounds N   alternated rounds of the three ways (default 3)
  --data DIR   token shards of the Handbook's base (default data/handbook: nanogrow prep --source demo
               --tokenizer bpe:2048 --val-every 16 --out data/handbook)
  --out DIR    where the runs go (default runs/lag-groups-bench)
TXT
}
set -euo pipefail
source "$(dirname "$0")/_common.sh"
ROUNDS=3 DATA=data/handbook OUT=runs/lag-groups-bench
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) usage; exit 2 ;;
  esac
done
[ -f "$DATA/meta.json" ] || { echo "launch/lag_groups_bench.sh: $DATA has no meta.json (see --help)" >&2; exit 2; }
mkdir -p "$OUT"
CFG="$OUT/lag.toml"
cat > "$CFG" <<TOML
[model]
n_layer = 4
d_model = 64
n_head = 4
n_kv_head = 2
vocab_size = 2048
max_seq_len = 128

[data]
dir = "$DATA"
seq_len = 128
shuffle_block = 1024

[train]
micro_batch = 8
global_batch = 16
max_steps = 64
lr = 8e-3
warmup_steps = 8
eval_every = 1000
log_every = 1000
seed = 0

[growth]
optimizer = "map+age"
lr_policy = "rewarm"
rewarm_steps = 8

[[stage]]
at_step = 32
shape = { n_layer = 8 }
lag = { candidates = "design-space", steps = 8, eval_every = 8, score_batches = 4, strategy = "all" }
TOML

one() {  # NAME, then the command
  local name=$1; shift
  local dir="$OUT/$name" t0 t1
  t0=$(date +%s.%N)
  "$@" --set "train.out_dir=$dir" --overwrite > "$OUT/$name.out" 2>&1 || { cat "$OUT/$name.out" >&2; exit 1; }
  t1=$(date +%s.%N)
  local line
  line=$(grep -h "LAG.*picked" "$dir/train.log" | tail -1)
  printf '%-5s %7.1f s  %s\n' "$name" "$(awk "BEGIN{print $t1 - $t0}")" "${line#*picked }"
}

echo "LAG across process groups vs one process: $(nproc) cores, torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
echo "name  command    winner (held-out loss after 8 steps ...); selection charged FLOPs, its wall-clock"
for r in $(seq 1 "$ROUNDS"); do
  OMP_NUM_THREADS=1 one 1p1t "$PYTHON" "${NANOGROW_MODULE[@]}" lag --config "$CFG" --set stage.1.lag.score_batches=8
  OMP_NUM_THREADS=2 one 1p2t "$PYTHON" "${NANOGROW_MODULE[@]}" lag --config "$CFG" --set stage.1.lag.score_batches=8
  OMP_NUM_THREADS=1 one 2g "${TORCHRUN[@]}" --standalone --nproc_per_node=2 "${NANOGROW_MODULE[@]}" lag \
    --config "$CFG" --groups 2
done
