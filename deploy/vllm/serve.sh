#!/usr/bin/env bash
# Starts one vLLM worker for tokengate: `vllm serve MODEL` with the flags the gateway relies on.
#
#   MODEL=meta-llama/Llama-3.1-8B-Instruct SERVED_MODEL_NAME=llama-3.1-8b \
#       VLLM_API_KEY=... deploy/vllm/serve.sh [more vllm serve flags]
#
# Environment (deploy/vllm/README.md says why each flag matters):
#   MODEL                   required: Hugging Face model id or local model directory
#   SERVED_MODEL_NAME       model name tenants send (default: MODEL)
#   HOST, PORT              listen address (default: 0.0.0.0, 8000)
#   MAX_NUM_SEQS            sequences run at once; later requests wait in vLLM (default: 128)
#   MAX_MODEL_LEN           context length, e.g. 16384 or 16k (default: the model's own)
#   GPU_MEMORY_UTILIZATION  fraction of each GPU's memory vLLM takes (default: 0.90)
#   TENSOR_PARALLEL_SIZE    GPUs one model is sharded over (default: 1)
#   VLLM_API_KEY            the worker's own key; vLLM reads it from the environment, which keeps
#                           it off the command line (`ps`). Unset or empty: /v1 is open.
#   EXTRA_ARGS              more flags, split on whitespace (no quoting; pass flags whose values
#                           contain spaces as arguments to this script instead)
#   VLLM                    the vllm executable (default: vllm on PATH)
#
# The script execs vllm, so SIGTERM and SIGINT reach vLLM itself.
set -euo pipefail

die() {
    echo "serve.sh: $*" >&2
    exit 2
}

require_positive_int() { # NAME VALUE
    case "$2" in
        '' | *[!0-9]* | 0*) die "$1 must be a positive integer, not '$2'" ;;
    esac
}

[[ -n "${MODEL:-}" ]] || die "set MODEL to a Hugging Face model id or a local model directory"
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-$MODEL}"
HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-8000}"
MAX_NUM_SEQS="${MAX_NUM_SEQS:-128}"
MAX_MODEL_LEN="${MAX_MODEL_LEN:-}"
GPU_MEMORY_UTILIZATION="${GPU_MEMORY_UTILIZATION:-0.90}"
TENSOR_PARALLEL_SIZE="${TENSOR_PARALLEL_SIZE:-1}"
VLLM="${VLLM:-vllm}"

require_positive_int PORT "$PORT"
require_positive_int MAX_NUM_SEQS "$MAX_NUM_SEQS"
require_positive_int TENSOR_PARALLEL_SIZE "$TENSOR_PARALLEL_SIZE"
[[ "$PORT" -le 65535 ]] || die "PORT must be at most 65535, not '$PORT'"
[[ "$GPU_MEMORY_UTILIZATION" =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] ||
    die "GPU_MEMORY_UTILIZATION must be a fraction in (0, 1], not '$GPU_MEMORY_UTILIZATION'"

extra=()
if [[ -n "${EXTRA_ARGS:-}" ]]; then
    read -r -a extra <<<"$EXTRA_ARGS"
fi

# --disable-log-stats turns off vLLM's Prometheus metrics, which the gateway routes on.
for arg in ${extra[@]+"${extra[@]}"} "$@"; do
    [[ "$arg" != --disable-log-stats ]] || die "--disable-log-stats removes the vllm:* metrics the gateway reads"
done

if [[ -z "${VLLM_API_KEY:-}" ]]; then
    unset VLLM_API_KEY
    echo "serve.sh: VLLM_API_KEY is not set: anyone who reaches port $PORT can use /v1" >&2
else
    export VLLM_API_KEY
fi

args=(
    serve "$MODEL"
    --served-model-name "$SERVED_MODEL_NAME"
    --host "$HOST"
    --port "$PORT"
    --max-num-seqs "$MAX_NUM_SEQS"
    --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION"
    --tensor-parallel-size "$TENSOR_PARALLEL_SIZE"
    --enable-prefix-caching
    --enable-prompt-tokens-details
    --disable-access-log-for-endpoints "/health,/metrics,/v1/models"
)
if [[ -n "$MAX_MODEL_LEN" ]]; then
    args+=(--max-model-len "$MAX_MODEL_LEN")
fi

exec "$VLLM" "${args[@]}" ${extra[@]+"${extra[@]}"} "$@"
