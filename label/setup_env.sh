#!/usr/bin/env bash
# Build (once) the MONAI Label server environment and print its location.
#
#   label/setup_env.sh            -> prints the venv folder; its bin/monailabel starts the server
#
# The venv lives outside the repository, in ${DAMM_LABEL_VENV:-$HOME/.cache/damm-drdm/label-venv}. It is keyed by a
# hash of requirements-label.txt and rebuilt only when that file changes, so every checkout on the machine shares it.
# The project itself is not installed there: the app (label/main.py) imports the checkout it lies in. The core
# environment is not touched. A fresh build downloads monailabel and its dependencies from PyPI and takes several
# minutes; progress goes to stderr, the venv path to stdout.
set -euo pipefail
trap 'echo "label/setup_env.sh: failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
req="$repo/requirements-label.txt"
venv="${DAMM_LABEL_VENV:-$HOME/.cache/damm-drdm/label-venv}"
python="${DAMM_LABEL_PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
key="$(sha256sum "$req" | cut -d' ' -f1)"
stamp="$venv/.damm-label-key"

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9  # one builder at a time; a second caller waits and then reuses the result

if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" && -x "$venv/bin/monailabel" ]]; then
    echo "$venv"
    exit 0
fi

echo "building the MONAI Label environment in $venv (key ${key:0:12})" >&2
rm -rf "$venv"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
{
    "${pip[@]}" install --upgrade "pip>=24" "setuptools>=68" wheel
    # torch first: sam2 (a monailabel dependency) is an sdist whose build imports torch; building it against the
    # installed torch (no build isolation, no CUDA extension) avoids a second torch download for the build.
    "${pip[@]}" install "$(grep -E '^torch==' "$req")" "$(grep -E '^torchvision==' "$req")" "numpy<2"
    SAM2_BUILD_CUDA=0 SAM2_BUILD_ALLOW_ERRORS=1 "${pip[@]}" install --no-build-isolation --no-deps "sam2==1.1.0"
    "${pip[@]}" install -r "$req"
    # a smoke import of what start_server needs: torchvision beside torch (monailabel.transform.post imports it),
    # pydicom-seg beside pydicom
    "$venv/bin/python" -c "import torch, torchvision, monai, monailabel, pydicom_seg, monailabel.transform.post; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'monai', monai.__version__, 'monailabel', monailabel.__version__)"
} >&2
echo "$key" >"$stamp"
echo "$venv"
