#!/usr/bin/env bash
# Every figure of this machine's accelerator in one JSON, offline (bench/device_check.py); about 8 minutes on a
# CUDA GPU, stopped at 9 (the JSON, written after every stage, keeps what finished). Extra arguments go to the
# script (--dry_run, --out FILE, --model DIR, --text FILE: the defaults read ../shared, beside the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
timeout 540 python bench/device_check.py "$@"
