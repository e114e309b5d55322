#!/usr/bin/env bash
# The test suite (the slow, gpu and real_weights markers are opt-in: bash test.sh -m slow).
source "$(dirname "$0")/tools/env.sh" requirements-test.txt
exec python -m pytest "$@"
