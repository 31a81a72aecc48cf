#!/usr/bin/env bash
# Download the wheels benchmarks/gpu/requirements.txt names into benchmarks/gpu/wheels/
# (ignored by git; carried to the lent GPU machine with the device tool's `carry`).
#
#   bash benchmarks/gpu/fetch_wheels.sh          # here, with internet (PyPI)
#   PRINT_ONLY=1 bash benchmarks/gpu/fetch_wheels.sh   # the commands, nothing downloaded
#
# Wheels for the lent machine, not for this one: CPython 3.12, manylinux x86-64, no
# dependencies (the image provides the rest; prove_wheels.sh checks that the set imports).
# antlr4-python3-runtime 4.9.3 (Hydra's parser) and wget 3.2 (imported by NeMo) exist on PyPI
# only as source: their pure-Python wheels are built here. Two wheels are slimmed to what the run
# reads (SLIM below), which keeps everything carried under the device tool's 64 MiB. Ends by
# printing the set, its size, and the carried total (working tree + wheels) as the tool counts it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WHEELS=${WHEELS:-$HERE/wheels}
PY=${PYTHON:-python3}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mapfile -t PINS < <(grep -vE '^\s*(#|$)' "$HERE/requirements.txt")
# Published on PyPI as source only: their pure-Python wheels are built here.
SOURCE_ONLY=(antlr4-python3-runtime wget)
DOWNLOAD=() BUILD=()
for pin in "${PINS[@]}"; do
  if printf '%s\n' "${SOURCE_ONLY[@]}" | grep -qx "${pin%%==*}"; then BUILD+=("$pin"); else DOWNLOAD+=("$pin"); fi
done

# Wheels slimmed after download: the members whose names this Python regex matches are dropped
# (and their RECORD lines). gensim: all but the two data files nemo_upcycle/data/assets.py reads
# (gensim itself is never imported). PuLP (imported by modelopt's searcher): its CBC solver
# binaries for six platforms and its tests, which nothing here runs. A rerun finds the slimmed
# files' hashes changed, so pip downloads those two whole again and they are slimmed again.
declare -A SLIM=(
  [gensim]='(?!gensim-[^/]+\.dist-info/|gensim/test/test_data/(lee_background\.cor|enwiki-latest-pages-articles1\.xml-p000000010p000030302-shortened\.bz2)$)'
  [pulp]='pulp/(solverdir/cbc/|tests/)'
)

download=("$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
          --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" --platform any -d "$WHEELS" "${DOWNLOAD[@]}")
build=("$PY" -m pip wheel --no-deps -w "$WHEELS" "${BUILD[@]}")
if [ "${PRINT_ONLY:-0}" = 1 ]; then
  echo "${download[*]}"
  echo "${build[*]}"
  exit 0
fi
mkdir -p "$WHEELS"
"${download[@]}"
"${build[@]}"
for name in "${!SLIM[@]}"; do
  for wheel in "$WHEELS/$name"-*.whl; do
    "$PY" - "$wheel" "${SLIM[$name]}" <<'SLIM_PY'
import csv, io, os, re, sys, zipfile
path, drop = sys.argv[1], re.compile(sys.argv[2])
with zipfile.ZipFile(path) as src:
    members = src.infolist()
    kept = [m for m in members if not drop.match(m.filename)]
    if len(kept) < len(members):
        with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as dst:
            for m in kept:
                data = src.read(m)
                if m.filename.endswith(".dist-info/RECORD"):
                    rows = [r for r in csv.reader(io.StringIO(data.decode())) if r and not drop.match(r[0])]
                    out = io.StringIO(); csv.writer(out, lineterminator="\n").writerows(rows); data = out.getvalue().encode()
                dst.writestr(m, data)
        os.replace(path + ".tmp", path)
        print(f"slimmed {os.path.basename(path)}: kept {len(kept)} of {len(members)} members")
SLIM_PY
  done
done
# Exactly one wheel per pin: two versions of one package stop `pip install --no-index`.
expected=${#PINS[@]}
found=$(ls "$WHEELS"/*.whl | wc -l)
[ "$found" -eq "$expected" ] || { echo "expected $expected wheels in $WHEELS, found $found: remove stale ones"; exit 1; }
ls -l "$WHEELS"/*.whl | awk '{printf "%8.2f MB  %s\n", $5 / 1e6, $NF}'
du -cb "$WHEELS"/*.whl | tail -1 | awk '{printf "total %.1f MB (%.1f MiB) in %d wheels\n", $1 / 1e6, $1 / 2^20, '"$found"'}'
# What the device tool carries: tracked and untracked-not-ignored files, plus the carried wheels.
REPO=$(cd "$HERE/../.." && pwd)
# (du exits 1 on a tracked file deleted in the working tree: counted without it, never an abort)
tree=$(git -C "$REPO" ls-files -z -co --exclude-standard | (cd "$REPO" && du -cb --files0-from=- 2>/dev/null || true) | tail -1 | cut -f1)
wheels=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
awk -v t="$tree" -v w="$wheels" 'BEGIN { printf "carried: working tree %.1f MiB + wheels %.1f MiB = %.1f MiB of the device tool'"'"'s 64 MiB\n", t / 2^20, w / 2^20, (t + w) / 2^20 }'
