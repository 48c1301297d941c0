#!/usr/bin/env bash
# Rebuild the git-ignored "site" folders that device calls carry (run here, from the repository root;
# needs PyPI, this machine's Python 3.11.7 site-packages and /root/.pyenv/versions/3.12.1):
#   .site-speed/   whl/ (transformers 5.23.0, trl 1.16.0, datasets 5.2.0, dill, multiprocess, peft 0.21.2,
#                  liger-kernel 0.8.5, hydra-core, omegaconf, antlr4 runtime, bitsandbytes 0.50.2 pruned to
#                  libbitsandbytes_cuda130.so) and lengths.json   (benchmarks/RESULTS.md, one-GPU speed "Commands")
#   .site-unsloth/ whl/ (19 wheels)                              (benchmarks/UNSLOTH.md, "Rebuild")
#   .site-gptq/    py/ (gptqmodel 7.6.0 and its pure-Python deps, cp312 pypcre, py312 multiprocess,
#                  gptqmodel_ext/{__init__.py,gptq_block/,pack_block_cpu.cpp}) and lib/libpcre2-8.so.0
#                  (RESULTS.md, QA-LoRA "Commands", without datasets/dill/torchao/hqq/peft)
# A folder that is already complete is left alone (FORCE=1 rebuilds it). Each folder is built in a temporary
# folder on the same filesystem and moved into place at the end, so an interrupted run leaves none half-made.
#   bash benchmarks/build_sites.sh                  # all three
#   ONLY="gptq unsloth" bash benchmarks/build_sites.sh   # a subset (speed, unsloth, gptq)
#   FORCE=1 / VERIFY=0 (skip the 3.12 install and import checks)
set -euo pipefail

ROOT=$PWD
[ -f "$ROOT/benchmarks/qlora_speed.py" ] && [ -f "$ROOT/pyproject.toml" ] \
  || { echo "run from the repository root (bash benchmarks/build_sites.sh)" >&2; exit 1; }
FORCE=${FORCE:-0}
VERIFY=${VERIFY:-1}
ONLY=${ONLY:-speed unsloth gptq}
PY=${PY:-python3}                                              # 3.11 with the project installed (lengths.json)
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python3.12}    # cp312 builds (pypcre) and the checks
SP311=${SP311:-/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages}  # gptqmodel & co. are copied from here
DL=(-m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform any)
T0=$SECONDS
TMP=$(mktemp -d "${TMPDIR:-/tmp}/build_sites.XXXXXX")   # every staging / download folder lives under it
trap 'rm -rf "$TMP"' EXIT
tmpdir() { mktemp -d "$TMP/XXXXXX"; }
log() { echo "[build_sites $((SECONDS - T0))s] $*"; }
want() { case " $ONLY " in *" $1 "*) return 0;; *) return 1;; esac; }
fail() { echo "build_sites: $*" >&2; return 1; }
# move a finished staging folder into place (rename: /tmp and the repo are one filesystem here; else mv copies)
install_dir() { rm -rf "$2"; mv "$1" "$2"; chmod 755 "$2"; }

# --- .site-speed -------------------------------------------------------------------------------------------
SPEED_PKGS=(transformers==5.23.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2
            liger-kernel==0.8.5 hydra-core==1.3.8 omegaconf==2.3.1 bitsandbytes==0.50.2)
SPEED_WHEELS=(transformers-5.23.0- trl-1.16.0- datasets-5.2.0- dill-0.4.1- multiprocess-0.70.19-py312 peft-0.21.2-
              liger_kernel-0.8.5- hydra_core-1.3.8- omegaconf-2.3.1- bitsandbytes-0.50.2- antlr4_python3_runtime-4.9.3-)

check_bnb() {  # $1 = the pruned wheel: one native library (CUDA 13.0), a RECORD that lists only what is there
  local libs rec_missing
  libs=$(unzip -Z1 "$1" | grep -E '\.so$' || true)
  [ "$libs" = bitsandbytes/libbitsandbytes_cuda130.so ] || { fail "$1 native libraries: ${libs//$'\n'/ }"; return 1; }
  rec_missing=$(comm -23 <(unzip -p "$1" 'bitsandbytes-0.50.2.dist-info/RECORD' | cut -d, -f1 | sort) \
                         <(unzip -Z1 "$1" | sort))
  [ -z "$rec_missing" ] || { fail "$1 RECORD lists files not in the wheel: $rec_missing"; return 1; }
}

check_speed() {  # $1 = folder
  local d=$1 p n
  [ -d "$d/whl" ] && [ -s "$d/lengths.json" ] || return 1
  for p in "${SPEED_WHEELS[@]}"; do ls "$d/whl/$p"*.whl >/dev/null 2>&1 || { fail "$d/whl lacks $p*.whl"; return 1; }; done
  n=$(ls "$d"/whl/*.whl | wc -l); [ "$n" -eq ${#SPEED_WHEELS[@]} ] || { fail "$d/whl holds $n wheels, not ${#SPEED_WHEELS[@]}"; return 1; }
  check_bnb "$d"/whl/bitsandbytes-0.50.2-*.whl || return 1
  "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['what']=='lengths' and d['rows']==len(d['prompt_completion_source'])>0" \
    "$d/lengths.json" || { fail "$d/lengths.json is not a lengths record"; return 1; }
}

build_speed() {
  local S W X bnb
  "$PY" -c "import ptq_qlora, hydra, datasets" 2>/dev/null \
    || fail "$PY cannot import ptq_qlora/hydra/datasets: run '$PY -m pip install -e . --no-deps' first (lengths.json)"
  [ -d "$ROOT/../shared/data/dialogsum" ] || fail "../shared/data/dialogsum missing (lengths.json reads the local data)"
  S=$(tmpdir); W=$(tmpdir); X=$(tmpdir); mkdir -p "$S/site/whl"
  log ".site-speed: downloading ${#SPEED_PKGS[@]} cp312 wheels"
  "$PY" "${DL[@]}" -d "$W" "${SPEED_PKGS[@]}"
  # bitsandbytes pruned to libbitsandbytes_cuda130.so, as in RESULTS.md "QLoRA data-parallel on 2 H200"
  bnb=$(ls "$W"/bitsandbytes-0.50.2-*.whl)
  (cd "$X" && unzip -q "$bnb" \
    && find bitsandbytes -name '*.so' ! -name libbitsandbytes_cuda130.so -delete \
    && grep -v -E 'libbitsandbytes_(cpu|cuda1[12]|cuda12[68]|cuda132|rocm|xpu)' bitsandbytes-0.50.2.dist-info/RECORD > R \
    && mv R bitsandbytes-0.50.2.dist-info/RECORD && zip -q -r -9 "$S/site/whl/$(basename "$bnb")" .)
  find "$W" -name '*.whl' ! -name 'bitsandbytes-*' -exec cp {} "$S/site/whl/" \;
  log ".site-speed: pip wheel antlr4-python3-runtime==4.9.3"
  "$PY" -m pip wheel -q --no-deps -w "$S/site/whl" antlr4-python3-runtime==4.9.3
  log ".site-speed: lengths.json (qlora_speed.py lengths: the real training mix, ~25 s)"
  "$PY" benchmarks/qlora_speed.py lengths --out "$S/site/lengths.json" 2>"$S/lengths.log" \
    || { tail -20 "$S/lengths.log" >&2; fail "qlora_speed.py lengths failed"; }
  check_speed "$S/site"
  install_dir "$S/site" "$ROOT/.site-speed"
}

# --- .site-unsloth (benchmarks/UNSLOTH.md "Rebuild", verbatim but for the staging folder) -----------------
UNSLOTH_WHEELS=(unsloth-2026.10.9- unsloth_zoo-2026.10.9- trl-1.15.0- datasets-4.8.5- torchao-0.18.0-
                cut_cross_entropy-25.1.1- tyro-1.0.17- docstring_parser-0.18.0- shtab-1.13.0- typeguard-4.6.1-
                msgspec-0.23.0-cp312 pydantic-2.14.4- pydantic_core-2.50.5-cp312 annotated_types-0.8.0-
                typing_inspection-0.4.5- typing_extensions-4.16.0- structlog-26.1.0- json5-0.17.3- nest_asyncio-1.6.0-)

check_unsloth() {
  local d=$1 p n
  [ -d "$d/whl" ] || return 1
  for p in "${UNSLOTH_WHEELS[@]}"; do ls "$d/whl/$p"*.whl >/dev/null 2>&1 || { fail "$d/whl lacks $p*.whl"; return 1; }; done
  n=$(ls "$d"/whl/*.whl | wc -l); [ "$n" -eq ${#UNSLOTH_WHEELS[@]} ] || { fail "$d/whl holds $n wheels, not ${#UNSLOTH_WHEELS[@]}"; return 1; }
  ! unzip -Z1 "$d"/whl/unsloth-2026.10.9-*.whl | grep -q -E '^(studio|unsloth_cli)/' || { fail "unsloth wheel not pruned"; return 1; }
  ! unzip -Z1 "$d"/whl/torchao-0.18.0-*.whl | grep -q -E '^(test/|torchao/_C.*\.so)' || { fail "torchao wheel not pruned"; return 1; }
}

build_unsloth() {
  local S W
  S=$(tmpdir); W=$(tmpdir)
  local DEST=$S/site/whl; mkdir -p "$DEST"
  log ".site-unsloth: downloading ${#UNSLOTH_WHEELS[@]} wheels"
  "$PY" "${DL[@]}" -d "$W" \
    unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 torchao==0.18.0 \
    cut_cross_entropy==25.1.1 tyro==1.0.17 docstring-parser==0.18.0 shtab==1.13.0 typeguard==4.6.1 \
    msgspec==0.23.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing-extensions==4.16.0 structlog==26.1.0 json5==0.17.3 nest-asyncio==1.6.0
  prune() {  # repack wheel $1 without the archive paths matching regex $2 (and their RECORD lines)
    local whl=$1 drop=$2 x; x=$(mktemp -d "$TMP/XXXXXX")
    (cd "$x" && unzip -q "$whl" && find . -type f | sed 's|^\./||' | grep -E "$drop" | xargs -r -d "\n" rm -f \
      && find . -type d -empty -delete && rec=$(ls -d *.dist-info)/RECORD \
      && grep -v -E "$drop" "$rec" > R && mv R "$rec" && zip -q -r -9 "$DEST/$(basename "$whl")" .)
    rm -rf "$x"
  }
  log ".site-unsloth: repacking unsloth (without studio/, unsloth_cli/) and torchao (without _C*.so, test/)"
  prune "$W"/unsloth-2026.10.9-*.whl '^(studio|unsloth_cli)/'
  prune "$W"/torchao-0.18.0-*.whl '^(test/|torchao/_C.*\.so)'
  for f in "$W"/*.whl; do case $(basename "$f") in unsloth-2*|torchao-*) ;; *) cp "$f" "$DEST/";; esac; done
  check_unsloth "$S/site"
  install_dir "$S/site" "$ROOT/.site-unsloth"
}

# --- .site-gptq --------------------------------------------------------------------------------------------
GPTQ_PURE=(gptqmodel logbar tokenicer defuser device_smi optimum termcolor)
GPTQ_EXT=(__init__.py gptq_block pack_block_cpu.cpp)  # what gptq_cuda.py and utils/cpp.py's pack_block_cpu load

check_gptq() {
  local d=$1 p extra
  [ -d "$d/py" ] && [ -d "$d/lib" ] || return 1
  for p in "${GPTQ_PURE[@]}" multiprocess; do  # (optimum is a namespace package: no __init__.py)
    [ -d "$d/py/$p" ] && ls -d "$d/py/$p"-[0-9]*.dist-info >/dev/null 2>&1 || { fail "$d/py lacks $p or its dist-info"; return 1; }
  done
  ls "$d"/py/pcre_ext_c.cpython-312-*.so "$d"/py/pypcre-0.6.4.dist-info >/dev/null 2>&1 && [ -f "$d/py/pcre/__init__.py" ] \
    || { fail "$d/py lacks the cp312 pypcre build"; return 1; }
  ls "$d"/py/gptqmodel-7.6.0.dist-info >/dev/null 2>&1 || { fail "$d/py: gptqmodel is not 7.6.0"; return 1; }
  for p in __init__.py pack_block_cpu.cpp gptq_block/gptq_block.cpp gptq_block/gptq_block.cu; do
    [ -s "$d/py/gptqmodel_ext/$p" ] || { fail "$d/py/gptqmodel_ext lacks $p"; return 1; }
  done
  extra=$(ls "$d/py/gptqmodel_ext" | grep -v -x -E '__init__\.py|gptq_block|pack_block_cpu\.cpp' || true)
  [ -z "$extra" ] || { fail "$d/py/gptqmodel_ext holds more than it should: $extra"; return 1; }
  [ -s "$d/lib/libpcre2-8.so.0" ] || { fail "$d/lib lacks libpcre2-8.so.0"; return 1; }
  for p in datasets dill peft torchao hqq; do [ ! -e "$d/py/$p" ] || { fail "$d/py holds $p (left out on purpose)"; return 1; }; done
}

build_gptq() {
  local S W py p di so lib
  [ -x "$PY312" ] || fail "no Python 3.12 at $PY312 (PY312=...)"
  [ -f "$SP311/gptqmodel-7.6.0.dist-info/RECORD" ] || fail "$SP311 lacks gptqmodel 7.6.0 (SP311=...)"
  S=$(tmpdir); W=$(tmpdir); py=$S/site/py; mkdir -p "$py" "$S/site/lib"
  log ".site-gptq: copying ${GPTQ_PURE[*]} (+ dist-info) from $SP311, without __pycache__ / .so"
  for p in "${GPTQ_PURE[@]}"; do
    di=$(cd "$SP311" && ls -d "$p"-[0-9]*.dist-info)
    [ "$(echo "$di" | wc -l)" -eq 1 ] || fail "$SP311: not one $p dist-info: $di"
    cp -r "$SP311/$p" "$SP311/$di" "$py/"
  done
  mkdir "$py/gptqmodel_ext"
  for p in "${GPTQ_EXT[@]}"; do cp -r "$SP311/gptqmodel_ext/$p" "$py/gptqmodel_ext/"; done
  find "$py" -name __pycache__ -type d -prune -exec rm -rf {} +
  find "$py" \( -name '*.so' -o -name '*.pyc' \) -delete
  log ".site-gptq: cp312 pypcre==0.6.4 (pip wheel with $PY312) and the py312 multiprocess wheel"
  "$PY312" -m pip wheel -q --no-deps -w "$W" pypcre==0.6.4
  "$PY" "${DL[@]}" -d "$W" multiprocess==0.70.19
  unzip -q -o "$W"/pypcre-0.6.4-cp312-cp312-*.whl -d "$py"
  unzip -q -o "$W"/multiprocess-0.70.19-py312-none-any.whl -d "$py"
  so=$(ls "$py"/pcre_ext_c.cpython-312-*.so)
  lib=$(ldd "$so" | awk '$1 == "libpcre2-8.so.0" {print $3}')
  [ -n "$lib" ] && [ -f "$lib" ] || lib=/usr/lib/x86_64-linux-gnu/libpcre2-8.so.0
  log ".site-gptq: lib/libpcre2-8.so.0 from $lib -> $(readlink -f "$lib")"
  cp -L "$lib" "$S/site/lib/libpcre2-8.so.0"
  check_gptq "$S/site"
  install_dir "$S/site" "$ROOT/.site-gptq"
}

# --- build what is missing ---------------------------------------------------------------------------------
for site in speed unsloth gptq; do
  want $site || continue
  d=$ROOT/.site-$site
  if [ "$FORCE" != 1 ] && [ -d "$d" ] && check_$site "$d" 2>/dev/null; then
    log ".site-$site complete, skipped (FORCE=1 rebuilds it)"
  else
    [ -d "$d" ] && log ".site-$site incomplete or FORCE=1: rebuilding"
    t=$SECONDS; build_$site; log ".site-$site built in $((SECONDS - t)) s"
  fi
done

# --- checks ------------------------------------------------------------------------------------------------
# a local import with PYTHONPATH=.site-gptq/py leaves __pycache__ there: not carried (the recipe has none)
want gptq && find "$ROOT/.site-gptq/py" -name __pycache__ -type d -prune -exec rm -rf {} +
for site in speed unsloth gptq; do
  want $site || continue
  check_$site "$ROOT/.site-$site" || exit 1
  log ".site-$site: contents check ok"
done
if [ "$VERIFY" = 1 ]; then
  V=$(tmpdir)
  if want speed; then  # the device's own command: pip install --no-index --no-deps --target (here under 3.12)
    "$PY312" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --target "$V/site" .site-speed/whl/*.whl
    log ".site-speed: $(ls .site-speed/whl/*.whl | wc -l) wheels install under $("$PY312" -V)"
    echo "  $(unzip -Z1 .site-speed/whl/bitsandbytes-*.whl | grep -c '\.so$') native library in bitsandbytes:" \
      "$(unzip -Z1 .site-speed/whl/bitsandbytes-*.whl | grep '\.so$')"
  fi
  if want unsloth; then
    extra=""; want speed && extra=$(ls .site-speed/whl/{bitsandbytes,peft,dill,multiprocess}-*.whl)
    # shellcheck disable=SC2086
    "$PY312" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --target "$V/site-unsloth" .site-unsloth/whl/*.whl $extra
    PYTHONPATH=$V/site-unsloth "$PY312" -c "import msgspec, pydantic, pydantic_core, tyro, typeguard, structlog, json5"
    log ".site-unsloth: $(ls .site-unsloth/whl/*.whl | wc -l) wheels (+ 4 from .site-speed) install under 3.12; msgspec/pydantic import"
  fi
  if want gptq; then
    PYTHONPATH=.site-gptq/py LD_LIBRARY_PATH=.site-gptq/lib "$PY312" -c \
      "import pcre, pcre_ext_c; assert pcre.compile(r'(?<w>\w+)@').search('a b@').group('w') == 'b'; print('  import pcre ok:', pcre.__file__)"
    echo "  pcre_ext_c -> $(LD_LIBRARY_PATH=.site-gptq/lib ldd .site-gptq/py/pcre_ext_c.cpython-312-*.so | grep pcre2)"
    # gptqmodel itself needs torch, which this machine's 3.12 lacks; its files must at least compile under 3.12
    PYTHONPYCACHEPREFIX=$V/pyc "$PY312" -m compileall -q .site-gptq/py/gptqmodel >/dev/null \
      || fail "gptqmodel does not compile under 3.12"
    log ".site-gptq: gptqmodel's files compile under 3.12 (importing it needs torch: the GPU image's)"
    echo "  gptqmodel_ext: $(cd .site-gptq/py/gptqmodel_ext && find . -type f | sort | tr '\n' ' ')"
  fi
fi
for site in speed unsloth gptq; do want $site && du -sh "$ROOT/.site-$site"; done
want speed && want unsloth && want gptq && du -shc .site-speed .site-unsloth .site-gptq | tail -1
log "done"
