#!/usr/bin/env bash
# Submit a GDPO-SR job to a running Ray cluster, from any directory.
#   RAY_ADDRESS=http://<head>:8265 deploy/submit.sh --config paper model.sd_path=/models/sd21 model.naosd_path=/models/naosd
#   ENTRY=learner.pretrain RAY_ADDRESS=... deploy/submit.sh --config paper_pretrain model.sd_path=/models/sd21 ...
# Extra arguments go to `python -m $ENTRY` (default: rollout, the GDPO training loop). The repository this
# script lives in is uploaded as the job's working directory; paths in the arguments are read on the cluster.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${RAY_ADDRESS:=http://127.0.0.1:8265}"
: "${ENTRY:=rollout}"
exec ray job submit --address "$RAY_ADDRESS" --working-dir "$repo" \
    --runtime-env "$repo/deploy/runtime_env.yaml" -- python -m "$ENTRY" "$@"
