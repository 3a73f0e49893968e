#!/usr/bin/env bash
# Run the test suite on a fresh machine: once per ComfyUI tree found, else once without ComfyUI.
#
#   scripts/run_tests.sh [pytest args]
#
# ComfyUI trees: COMFYUI_PATH (one folder, or several joined by ':'), else every <dir>/ComfyUI under
# COMFYUI_TREES (default ~/comfyui-trees, e.g. ~/comfyui-trees/v0.33.0/ComfyUI). For each tree the whole
# suite runs in that tree's own environment (<tree>/../venv): its requirements.txt (not its torch pins),
# this pack's requirements and the test requirements. Every tree environment shares one PyTorch
# (COMFYUI_TREES/torch-venv: torch 2.14.1, torchvision 0.29.1, torchaudio) through a .pth file, so a tree
# costs a few hundred MB, not the 5.5 GB of a CUDA torch. Without any tree the suite runs in .venv on the
# CPU torch 2.13 wheel and the ComfyUI tests skip, saying why. The CUDA build tests compile every kernel with
# NVRTC and need no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TREES_DIR=${COMFYUI_TREES:-$HOME/comfyui-trees}
export PIP_DISABLE_PIP_VERSION_CHECK=1

pip_quiet() { python -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }

# The shared PyTorch of the tree environments (made once).
torch_env() {
    local base=$TREES_DIR/torch-venv
    if [ ! -f "$base/.complete" ]; then
        rm -rf "$base"
        "$PYTHON" -m venv "$base"
        (. "$base/bin/activate"
         pip_quiet --upgrade pip
         pip_quiet torch==2.14.1 torchvision==0.29.1
         # ComfyUI v0.33 imports torchaudio at start; this build imports beside torch 2.14.1.
         pip_quiet --no-deps torchaudio==2.11.1)
        touch "$base/.complete"
    fi
    "$base/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"
}

# <tree>/../venv with the tree's requirements; prints nothing, leaves it activated.
tree_env() {
    local tree=$1 venv stamp
    venv=$(dirname "$tree")/venv
    stamp=$(cat "$tree/requirements.txt" requirements.txt requirements-test.txt | sha1sum | cut -c1-12)
    if [ ! -f "$venv/.complete-$stamp" ]; then
        local torch_site
        torch_site=$(torch_env)
        rm -rf "$venv"
        "$PYTHON" -m venv "$venv"
        echo "$torch_site" > "$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/shared-torch.pth"
        . "$venv/bin/activate"
        pip_quiet --upgrade pip
        grep -vE '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$tree/requirements.txt" > "$venv/comfyui-requirements.txt"
        # requests: ComfyUI before v0.33 imports it (app/frontend_management.py) without listing it
        pip_quiet -r "$venv/comfyui-requirements.txt" -r requirements.txt -r requirements-test.txt requests
        touch "$venv/.complete-$stamp"
    else
        . "$venv/bin/activate"
    fi
}

trees=()
if [ -n "${COMFYUI_PATH:-}" ]; then
    IFS=: read -r -a trees <<< "$COMFYUI_PATH"
elif [ -d "$TREES_DIR" ]; then
    while IFS= read -r t; do
        [ -f "$t/comfy/model_management.py" ] && trees+=("$t")
    done < <(printf '%s\n' "$TREES_DIR"/*/ComfyUI | sort -V)
fi

if [ ${#trees[@]} -eq 0 ]; then
    echo "== no ComfyUI tree (COMFYUI_PATH unset, none under $TREES_DIR): the ComfyUI tests skip"
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    . .venv/bin/activate
    pip_quiet --upgrade pip
    python -c "import torch" 2>/dev/null || pip_quiet "torch==2.13.0" || pip_quiet torch
    pip_quiet -r requirements.txt -r requirements-test.txt
    exec python -m pytest "$@"
fi

status=0
summary=()
only=()  # the first tree runs the whole suite; the others only what uses ComfyUI (the rest cannot differ)
for tree in "${trees[@]}"; do
    version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$tree/comfyui_version.py" 2>/dev/null || true)
    echo "== ComfyUI ${version:-?} at $tree${only:+ (tests that use ComfyUI)}"
    log=${TMPDIR:-/tmp}/svdquant-tests-${version:-tree}.log
    set +e
    (tree_env "$tree" && COMFYUI_PATH=$tree python -m pytest "${only[@]}" "$@") 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    [ "$rc" -eq 0 ] || status=$rc
    result=$(grep -E '^=+ .*(passed|failed|error).* =+$' "$log" | tail -1 | tr -d '=' || true)
    summary+=("ComfyUI ${version:-?}:${result:- no result} (exit $rc)")
    only=(--comfyui-only)
done
echo
echo "== covered: ${#trees[@]} ComfyUI tree(s)"
printf '   %s\n' "${summary[@]}"
exit $status
