# Source at the start of a device command (bench/*.sh): installs the carried wheels (.whl, see the
# device tool's README) into /tmp/site, the project in editable mode, and sets TRITON_INTERPRET=0
# (tests/conftest.py defaults to the interpreter). Carry [".whl"].
[ -d /tmp/site/fastapi ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl .whl/serve/*.whl .whl/test/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python3 -c "import stepvox" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation --use-pep517 -e . >/dev/null 2>&1
python3 -c "import stepvox.engine" 2>/dev/null || export PYTHONPATH=/tmp/site:$PWD/python:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
