#!/usr/bin/env bash
# Create .venv if missing and install Scion. Flags combine (`--cuda --test`):
#   --test  the test and parity extras (requirements-test.txt)
#   --cuda  jax's CUDA 12 build (requirements-cuda.txt); needs an NVIDIA GPU here
#   --tpu   jax's TPU build (requirements-tpu.txt); needs a TPU here
# SCION_SKIP_DEVICE_CHECK=1 installs --cuda or --tpu without that device: on a cluster's login
# node, say, whose checkout the GPU nodes share.
# Idempotent: a stamp of the requirement files skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$PWD/.cache/pip}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

fail() { echo "launch/setup.sh: $*" >&2; exit 2; }

# jax's own test for a GPU is these device files (/dev/dxg: WSL2); nvidia-smi covers drivers
# that make them on first use. (grep without -q reads all: no SIGPIPE fails the pipe.)
has_gpu() {
  compgen -G '/dev/nvidia[0-9]*' >/dev/null || [[ -e /dev/dxg ]] ||
    nvidia-smi -L 2>/dev/null | grep '^GPU ' >/dev/null
}

# As jax finds TPUs: a PCI device of Google's (vendor 0x1ae0) with a TPU's device id (v3 to
# TPU7x; Google's other PCI devices, such as every GCE VM's gVNIC, are not TPUs). /dev/accel*
# also counts, for generations newer than that list.
has_tpu() {
  local dev ids=" 0x0027 0x0056 0x005e 0x0062 0x0063 0x006f 0x0076 "
  compgen -G '/dev/accel*' >/dev/null && return 0
  for dev in /sys/bus/pci/devices/*; do
    [[ "$(cat "$dev/vendor" 2>/dev/null)" == 0x1ae0 &&
       "$ids" == *" $(cat "$dev/device" 2>/dev/null) "* ]] && return 0
  done
  return 1
}

# needs CHECK MESSAGE: stop with MESSAGE unless CHECK finds the device (or the check is skipped).
needs() { [[ "${SCION_SKIP_DEVICE_CHECK:-}" == 1 ]] || "$1" || fail "$2"; }
skip="set SCION_SKIP_DEVICE_CHECK=1 to install anyway"

# Every flag is checked before .venv is touched: a wrong one must not leave a half install.
files=(requirements.txt requirements-data.txt pyproject.toml)
requirements=(-r requirements.txt)
add() { [[ " ${files[*]} " == *" $1 "* ]] || { files+=("$1"); requirements+=(-r "$1"); }; }
build=""
for flag in "$@"; do
  case "$flag" in
    --test) add requirements-test.txt ;;
    --cuda | --tpu)
      [[ -z "$build" || "$build" == "$flag" ]] ||
        fail "$build and $flag: one jax build per .venv, expected only one of them"
      build="$flag"
      if [[ "$flag" == --cuda ]]; then
        needs has_gpu "--cuda: no NVIDIA GPU here (no /dev/nvidia0, nvidia-smi lists none); $skip"
        add requirements-cuda.txt
      else
        needs has_tpu "--tpu: no TPU here (no /dev/accel*, no TPU on the PCI bus); $skip"
        add requirements-tpu.txt
      fi ;;
    *) fail "unknown flag '$flag': expected any of --test, --cuda, --tpu" ;;
  esac
done

# Jobs sharing this checkout (a Slurm array, say) install one at a time; the rest find the stamp.
mkdir -p .cache
exec 9>.cache/setup.lock
if command -v flock >/dev/null; then flock 9; fi
[[ -x .venv/bin/python ]] || python3.11 -m venv .venv
stamp=".venv/.scion-installed-$(cat "${files[@]}" | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  # One resolve over every file: the extras' pins must agree with requirements.txt's.
  .venv/bin/pip install -q "${requirements[@]}"
  .venv/bin/pip install -q --no-deps -r requirements-data.txt
  .venv/bin/pip install -q --no-deps -e .
  touch "$stamp"
fi
