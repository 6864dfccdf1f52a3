#!/usr/bin/env bash
# `pip install scaleforge` alone (no extras) from this checkout into a new virtual environment, then, in an empty
# folder: import it, train, evaluate, plot, list, export to torch.export, read `serve --help`, and check that each
# command needing an extra says which in one line (exit 2).
# Usage: tests/lean_install.sh [VENV]   (default: a temporary folder). About 4 minutes on 2 cores, most of it pip's.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$(mktemp -d)/lean}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"${PYTHON:-python3.11}" -m venv "$venv"
"$venv/bin/pip" install -q -c "$repo/constraints.txt" "$repo"
echo "core install: $("$venv/bin/pip" list 2>/dev/null | tail -n +3 | wc -l) packages"
cd "$work"
"$venv/bin/python" -c "import scaleforge"
for module in fastapi uvicorn orjson onnx onnxruntime onnxscript torchao cv2 optuna aiohttp datasets tokenizers boto3; do
    if "$venv/bin/python" -c "import $module" 2>/dev/null; then
        echo "FAIL: $module is installed by the core install"
        exit 1
    fi
done
"$venv/bin/scaleforge" train training.epochs=1 logging.progress=none --run-dir r
"$venv/bin/scaleforge" eval r
"$venv/bin/scaleforge" plot r
"$venv/bin/scaleforge" runs .
"$venv/bin/scaleforge" config show r/config.yaml >/dev/null
"$venv/bin/scaleforge" list
"$venv/bin/scaleforge" export r --format torch-export
"$venv/bin/scaleforge" serve --help >/dev/null

# each command that needs an extra, and the extra its one line must name
status=0
while IFS='|' read -r extra command; do
    code=0
    # shellcheck disable=SC2086 - the command's words
    "$venv/bin/scaleforge" $command 2>err.txt >/dev/null </dev/null || code=$?
    if [[ $code == 2 && $(wc -l <err.txt) == 1 ]] && grep -qF "needs the [$extra] extra: pip install 'scaleforge[$extra]'" err.txt; then
        echo "ok   scaleforge $command: $(cat err.txt)"
    else
        echo "FAIL scaleforge $command (exit $code): $(cat err.txt)"
        status=1
    fi
done <<'COMMANDS'
serve|serve r
export|export r --format onnx
export|compress r --method static-int8
stream|stream r --source synthetic:8x8
search|search --space space.yaml
search|search show study
serve|bench serve r
export|bench compress r
data|data prepare r --out shards
data|train data.dataset=shards data.path=shards
data|train data.dataset=text data.path=r/config.yaml data.tokenizer=bpe
COMMANDS
exit $status
