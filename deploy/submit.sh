#!/usr/bin/env bash
# Submit a GDPO-SR training job to a running Ray cluster.
#   RAY_ADDRESS=http://<head>:8265 deploy/submit.sh --config paper model.sd_path=/models/sd21 model.naosd_path=/models/naosd
# Extra arguments go to `python -m rollout`. Run from the repository root.
set -euo pipefail
: "${RAY_ADDRESS:=http://127.0.0.1:8265}"
exec ray job submit --address "$RAY_ADDRESS" --runtime-env deploy/runtime_env.yaml -- python -m rollout "$@"
