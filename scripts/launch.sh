# Sourced by scripts/train.sh and scripts/eval.sh: one-line errors, the process count, and the launcher.
#   NGPUS        processes on this machine (default: the GPUs this process can see, else 1)
#   NNODES       machines (default 1); with more than one, also NODE_RANK (this machine's index, 0 on the
#                first), MASTER_ADDR (the first machine's address) and MASTER_PORT (default 29500)
#   PYTHON       the interpreter (default python, else python3)
#   DRY_RUN=1    print the command instead of running it
# One process runs as plain `python main.py` (no torchrun); several run under torchrun.
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null || PYTHON=python3

fail() { echo "error: $*" >&2; exit 2; }

visible_gpus() {
    if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then  # set (maybe empty): what the process may use
        local list=${CUDA_VISIBLE_DEVICES//,/ }
        set -- $list
        echo $#
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

NGPUS=${NGPUS:-$(visible_gpus)}
[ "$NGPUS" -ge 1 ] 2>/dev/null || NGPUS=1
NNODES=${NNODES:-1}

launch() {  # launch main.py ARGS...
    local cmd
    if [ "$NNODES" -gt 1 ]; then
        [ -n "${NODE_RANK:-}" ] || fail "NNODES=$NNODES: set NODE_RANK (0 on the first machine, 1, 2, ... on the others)"
        [ -n "${MASTER_ADDR:-}" ] || fail "NNODES=$NNODES: set MASTER_ADDR to the address of the first machine (NODE_RANK=0)"
        cmd=(torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR"
             --master_port="${MASTER_PORT:-29500}" --nproc_per_node="$NGPUS" "$@")
    elif [ "$NGPUS" -gt 1 ]; then
        cmd=(torchrun --standalone --nproc_per_node="$NGPUS" "$@")
    else
        cmd=("$PYTHON" "$@")
    fi
    if [ "${DRY_RUN:-0}" = 1 ]; then
        echo "${cmd[@]}"
    else
        "${cmd[@]}"
    fi
}
