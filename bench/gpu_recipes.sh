#!/usr/bin/env bash
# The best CIFAR-10 test accuracy at most 0.5M parameters reach in minutes of one GPU: the recipe
# family of bench/recipe80.yaml, several variants trained at once on the one GPU (a tiny ViT
# leaves a GPU waiting for kernel launches, so 4 processes each train at ~70% of one alone,
# bench/RESULTS.md), each for a wall-clock budget that bench/speed.py's budgets part sizes into
# epochs from a calibration run. Sharing makes every figure a lower bound for the GPU alone.
#
#   bash bench/gpu_recipes.sh DATA SECONDS [OUTDIR [bench/speed.py options for every variant]]
#
# DATA: CIFAR-10 as an image folder or a tar archive of one; SECONDS: each variant's budget
# (calibration, data load and compile come on top: about 60 s); OUTDIR (default gpu-recipes):
# one log per variant, the last lines of which are its budgets table. Needs python3 ($PYTHON) with
# torch, pyyaml and tqdm.
set -uo pipefail
usage="usage: bash bench/gpu_recipes.sh DATA SECONDS [OUTDIR [bench/speed.py options]]"
data=$(realpath -e -- "${1:?$usage}") || exit 2  # paths as given, before the cd below
seconds=${2:?$usage}
out=$(realpath -m -- "${3:-gpu-recipes}")
shift $(( $# < 3 ? $# : 3 ))  # what is left goes to every variant, e.g. --set data.subset=512
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"

# name, then the overrides of bench/recipe80.yaml (params counted by tinyvit.model.count_params)
variants=(
    "recipe80"                                                          # 278k: the CPU recipe
    "cct4 model.embed_dim=128 model.depth=4 model.mlp_ratio=1.0 model.pool=seq model.drop_path=0.1"  # 492k
    "cct4-mix model.embed_dim=128 model.depth=4 model.mlp_ratio=1.0 model.pool=seq model.drop_path=0.1 data.mixup=0.8 data.cutmix=1.0"
    "wide3-mix-ema model.embed_dim=128 model.depth=3 model.mlp_ratio=2.0 model.pool=seq model.drop_path=0.1 data.mixup=0.8 data.cutmix=1.0 train.ema=0.999"  # 491k
)

# decode the images once, into the cache every variant then reads (at the default data.cache_dir)
$PY -c "import sys; from tinyvit.config import load; from tinyvit.data import load_arrays
load_arrays(load('bench/recipe80.yaml', ['data.source=imagefolder', 'data.root=' + sys.argv[1]]).data)" \
    "$data" || exit 2

pids=()
for v in "${variants[@]}"; do
    read -r name overrides <<< "$v"
    sets=()
    for o in $overrides; do sets+=(--set "$o"); done
    PYTHONUNBUFFERED=1 $PY bench/speed.py --part budgets --seconds --budgets "$seconds" --seeds 0 \
        --config bench/recipe80.yaml --data "$data" ${sets[@]+"${sets[@]}"} "$@" > "$out/$name.log" 2>&1 &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for v in "${variants[@]}"; do
    read -r name _ <<< "$v"
    echo "== $name: $(grep -m1 'params)' "$out/$name.log")"
    sed -n '/^  seed  *budget/,$p' "$out/$name.log" | grep . || tail -n 5 "$out/$name.log"
done
exit $rc
