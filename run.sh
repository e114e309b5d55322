#!/usr/bin/env bash
# The main job: synthetic data -> train -> evaluate -> report (workdirs/synthetic by default).
#   bash run.sh [--workdir DIR] [--config.train.steps=N ...]
source "$(dirname "$0")/tools/env.sh" requirements.txt
exec python -m dynrefer_jax.main "$@"
