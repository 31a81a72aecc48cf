#!/usr/bin/env bash
# Prove here, before any lease, that the carried wheels plus what the lent image already holds
# import everything the GPU run imports (a lease must never be where a missing module is
# found), then run the GPU script's CPU dry run in that environment.
#
#   bash benchmarks/gpu/fetch_wheels.sh && bash benchmarks/gpu/prove_wheels.sh
#
# The environment: a Python 3.12 virtualenv (pyenv's) holding the lent image's packages
# (/work/.library/device/KINDS.md: torch 2.11.0, transformers 5.x, lightning, numpy 2, ...;
# installed from PyPI --no-deps, so nothing the image lacks sneaks in as a dependency; PyPI's
# torch 2.11.0 is its CUDA 13 build, which runs on a CPU), and the carried wheels installed
# exactly as run.sh installs them there: --no-index --no-deps --target + PYTHONPATH.
# PROOF_VENV (default /tmp/gpu-proof-venv) is reused when it exists; DRY_RUN=0 skips the dry run.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${PROOF_VENV:-/tmp/gpu-proof-venv}
SITE=${PROOF_SITE:-$VENV.carried}
PY312=${PYTHON312:-$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -1 || true)}
# The image's packages (KINDS.md's list without the JAX, CuPy, ONNX Runtime, OpenCV, MPI and
# Gaussian-process families, which nothing here imports); versions where KINDS.md names them.
# Only names from that list: a package the image lacks must never make the proof pass.
IMAGE=(torch==2.11.0 triton==3.6.0 transformers==5.17.0 tokenizers==0.23.2 huggingface_hub==1.33.0
       safetensors==0.8.0 accelerate==1.15.0 numpy==2.5.2 pytorch-lightning==2.6.6 torchmetrics==1.9.0
       sentencepiece==0.2.2 tiktoken==0.14.0 lightning lightning-utilities
       absl-py aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click
       cloudpickle colorama contourpy cycler einops etils filelock fonttools frozenlist fsspec grpcio h11 h5py
       hf-xet httpcore httpx idna jinja2 joblib kiwisolver markdown markdown-it-py markupsafe matplotlib mdurl
       ml-dtypes mpmath msgpack multidict mypy-extensions networkx opt-einsum packaging pandas pathspec peft
       pillow pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pygments pyparsing
       pyre-extensions python-dateutil pyyaml regex requests rich sacrebleu scikit-learn scipy setuptools
       shellingham simplejson six sortedcontainers sympy tabulate tensorboard tensorboard-data-server
       tensorstore threadpoolctl toolz tqdm typer typing-extensions typing-inspect urllib3 werkzeug wheel wrapt
       xxhash yarl zipp cuda-bindings cuda-pathfinder cuda-toolkit nvidia-cublas nvidia-cuda-cupti
       nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
       nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvjitlink
       nvidia-nvshmem-cu13 nvidia-nvtx pytest narwhals numba llvmlite lxml statsmodels patsy seaborn xarray
       imageio lazy-loader scikit-image tifffile hypothesis humanize timm torchvision==0.26.0 torchaudio==2.11.0
       jaxtyping wadler-lindig py-cpuinfo execnet iniconfig coverage pytest-benchmark pytest-cov pytest-mock
       pytest-timeout pytest-xdist build pyproject-hooks cython ninja pybind11 uvloop aiofiles multipledispatch
       formulaic interface-meta onnx onnx-ir onnxscript flatbuffers sentence-transformers torchdiffeq)

[ -x "$PY312" ] || { echo "no Python 3.12 found (pyenv versions); set PYTHON312"; exit 2; }
ls "$REPO"/benchmarks/gpu/wheels/*.whl >/dev/null 2>&1 || { echo "no wheels: run benchmarks/gpu/fetch_wheels.sh"; exit 2; }
if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
fi
if [ ! -f "$VENV/.image-packages" ]; then
  "$VENV/bin/python" -m pip install -q --no-deps "${IMAGE[@]}"
  touch "$VENV/.image-packages"
fi
rm -rf "$SITE"
# As run.sh does on the lent machine.
"$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$REPO"/benchmarks/gpu/wheels/*.whl
export PYTHONPATH="$SITE:$REPO"
# megatron-core 0.15.3 builds a CUDA allocator extension when it is imported under a CUDA torch
# (megatron/core/inference/unified_memory.py, torch's load_inline). Without a GPU the arch list
# is empty and torch raises an IndexError megatron-core does not catch; with one architecture
# named, the build fails for want of nvcc, which megatron-core catches (a warning). There the
# GPU names its architecture; run.sh sets the same variable.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
"$VENV/bin/python" - <<'PY'
import importlib, sys, warnings
warnings.filterwarnings("ignore")
print(sys.version.split()[0])
from benchmarks.gpu.device_run import IMPORTED_MODULES
# nemo.collections.llm imports its api (llm.train, which the training job calls) and recipes
# inside a try that turns an ImportError into a warning, so importing the collection proves
# nothing about them: import the api itself too. ModelOpt comes first: when NeMo's import of it
# fails, modelopt swallows the missing module's name.
for name in ("modelopt.torch.opt", "modelopt.torch.distill", *IMPORTED_MODULES):
    module = importlib.import_module(name)
    print(f"  import {name}: ok ({getattr(module, '__version__', '')})")
import nemo.collections.llm as llm
assert callable(getattr(llm, "train", None)), "nemo.collections.llm.train is missing"
print("  nemo.collections.llm.train: ok")
# The data files the slimmed gensim wheel carries, found where the run looks for them.
from nemo_upcycle.data.assets import heldout_news_text, wikipedia_sample
for asset in (wikipedia_sample(), heldout_news_text()):
    print(f"  data {asset}: ok ({asset.stat().st_size / 1e6:.2f} MB)")
PY
if [ "${DRY_RUN:-1}" = 1 ]; then
  PYTHON="$VENV/bin/python" DRY_RUN=1 bash "$REPO/benchmarks/gpu/run.sh"
fi
