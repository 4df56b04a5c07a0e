#!/bin/bash
# Builds the libFuzzer targets of tests/fuzz with clang++
# (-fsanitize=fuzzer,address,undefined) straight from the sources they need,
# then runs each one for a budget and reports libFuzzer's execution count.
#
#   tests/fuzz/build_and_run.sh [--build-dir DIR] [--runs N] [--time SECONDS]
#                               [--jobs N] [--sanitizers LIST] [--max-len N]
#                               [TARGET...]
#
# TARGET is fuzz_control_request, fuzz_mount_options or fuzz_journal (default:
# all). --runs caps the executions per target (-runs), --time the seconds
# (-max_total_time); give either or both (default: --time 20). New corpus
# entries go to DIR/corpus/TARGET; the seeds in tests/fuzz/corpus/TARGET are
# read, never written. A crash leaves its input in DIR/artifacts/.
# --sanitizers (default address,undefined) is what goes with fuzzer in
# -fsanitize=; "undefined" alone runs many times faster where a target
# allocates large buffers (ASan maps and unmaps each one).
#
# Exit status: 0 every target ran its budget without a finding, 1 a target
# crashed or a sanitizer reported, 2 bad usage or a build failure, 77 (meson's
# "skipped") when clang++ or its libFuzzer runtime is not installed.
set -euo pipefail

here=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
top=$(cd "$here/../.." && pwd)
build="$top/build-fuzz"
runs=""
max_time=""
jobs=2
sanitizers=address,undefined
max_len=65536
targets=()

while [[ $# -gt 0 ]]; do
  case $1 in
    --build-dir) build=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --time) max_time=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --sanitizers) sanitizers=$2; shift 2 ;;
    --max-len) max_len=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "build_and_run.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if [[ -z $runs && -z $max_time ]]; then max_time=20; fi
all_targets=(fuzz_control_request fuzz_mount_options fuzz_journal)
explicit=1
if [[ ${#targets[@]} -eq 0 ]]; then
  targets=("${all_targets[@]}")
  explicit=0
fi

CXX=${FUZZ_CXX:-clang++}
if ! command -v "$CXX" >/dev/null 2>&1; then
  echo "build_and_run.sh: $CXX not found (apt-get install clang): skipping" >&2
  exit 77
fi

# The sources each target needs, besides its own file. Only the parts under
# test: no FUSE, no io_uring.
sources_of() {
  case $1 in
    fuzz_control_request) echo "src/protocol.cc src/reports.cc" ;;
    fuzz_mount_options) echo "src/options.cc" ;;
    fuzz_journal) echo "src/journal.cc" ;;
    *) return 1 ;;
  esac
}
libs_of() {
  case $1 in
    fuzz_journal) echo "-lxxhash" ;;
    *) echo "" ;;
  esac
}

obj_dir="$build/obj-${sanitizers//,/-}"
bin_dir="$build/bin-${sanitizers//,/-}"
mkdir -p "$obj_dir" "$bin_dir" "$build/artifacts"
# What meson's private config header defines (see meson.build).
cat > "$build/deferfs_config.h.new" <<'EOF'
#pragma once
#define DEFERFS_VERSION "fuzz"
#define FUSE_USE_VERSION 314
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
EOF
if ! cmp -s "$build/deferfs_config.h.new" "$build/deferfs_config.h" 2>/dev/null; then
  mv "$build/deferfs_config.h.new" "$build/deferfs_config.h"
else
  rm -f "$build/deferfs_config.h.new"
fi

cxxflags=(-std=c++20 -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,$sanitizers
          -fno-sanitize-recover=all -I"$top/include" -I"$build" -include deferfs_config.h -pthread)

# A probe: can this clang link a fuzzer at all (libclang-rt-*-dev)?
probe="$obj_dir/probe"
if [[ ! -x $probe ]]; then
  printf '#include <cstdint>\n#include <cstddef>\nextern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }\n' \
    > "$obj_dir/probe.cc"
  if ! "$CXX" "${cxxflags[@]}" "$obj_dir/probe.cc" -o "$probe" >"$obj_dir/probe.log" 2>&1; then
    echo "build_and_run.sh: $CXX cannot build a libFuzzer target (is libclang-rt-dev installed?): skipping" >&2
    sed 's/^/  /' "$obj_dir/probe.log" >&2
    exit 77
  fi
fi

# Compiles one source to an object unless the object is newer than it and
# every header (a coarse but safe rule).
newest_header=$(find "$top/include" -name '*.h' -printf '%T@\n' | sort -n | tail -1)
compile() {
  local src=$1 obj=$2
  if [[ -f $obj ]]; then
    local t_obj t_src
    t_obj=$(stat -c %Y "$obj")
    t_src=$(stat -c %Y "$src")
    if (( t_obj > t_src && t_obj > ${newest_header%.*} )) && [[ "$build/deferfs_config.h" -ot $obj ]]; then
      return 0
    fi
  fi
  "$CXX" "${cxxflags[@]}" -c "$src" -o "$obj"
}

obj_of() { echo "$obj_dir/$(echo "$1" | tr '/' '_').o"; }

# By default, a target whose sources are not there (yet) is left out.
if (( ! explicit )); then
  kept=()
  for t in "${targets[@]}"; do
    missing=""
    for s in "tests/fuzz/$t.cc" $(sources_of "$t"); do [[ -f "$top/$s" ]] || missing="$s"; done
    if [[ -n $missing ]]; then
      echo "build_and_run.sh: leaving out $t: $missing does not exist" >&2
    else
      kept+=("$t")
    fi
  done
  targets=("${kept[@]}")
fi

# Build: every object once, up to --jobs at a time, then link each target.
declare -A seen
all_sources=()
for t in "${targets[@]}"; do
  if ! srcs=$(sources_of "$t"); then
    echo "build_and_run.sh: unknown target $t" >&2
    exit 2
  fi
  for s in "tests/fuzz/$t.cc" $srcs; do
    if [[ ! -f "$top/$s" ]]; then
      echo "build_and_run.sh: $t needs $s, which does not exist" >&2
      exit 2
    fi
    if [[ -z ${seen[$s]+x} ]]; then
      seen[$s]=1
      all_sources+=("$s")
    fi
  done
done
pids=()
build_failed=0
for s in "${all_sources[@]}"; do
  compile "$top/$s" "$(obj_of "$s")" &
  pids+=($!)
  if (( ${#pids[@]} >= jobs )); then
    wait "${pids[0]}" || build_failed=1
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p" || build_failed=1; done
if (( build_failed )); then
  echo "build_and_run.sh: build failed" >&2
  exit 2
fi
for t in "${targets[@]}"; do
  list=()
  for s in "tests/fuzz/$t.cc" $(sources_of "$t"); do list+=("$(obj_of "$s")"); done
  # shellcheck disable=SC2046
  if ! "$CXX" "${cxxflags[@]}" "${list[@]}" $(libs_of "$t") -o "$bin_dir/$t"; then
    echo "build_and_run.sh: linking $t failed" >&2
    exit 2
  fi
done

# Run. The journal target writes a file per execution: on tmpfs if we can.
if [[ -z ${FUZZ_TMPDIR:-} && -d /dev/shm && -w /dev/shm ]]; then FUZZ_TMPDIR=/dev/shm; fi
export TMPDIR=${FUZZ_TMPDIR:-${TMPDIR:-/tmp}}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
status=0
summary=()
for t in "${targets[@]}"; do
  corpus="$build/corpus/$t"
  mkdir -p "$corpus"
  seeds=()
  [[ -d "$here/corpus/$t" ]] && seeds+=("$here/corpus/$t")
  args=(-artifact_prefix="$build/artifacts/$t-" -print_final_stats=1 -max_len="$max_len" -timeout=10 -rss_limit_mb=4096)
  [[ -n $runs ]] && args+=(-runs="$runs")
  [[ -n $max_time ]] && args+=(-max_total_time="$max_time")
  [[ -f "$here/$t.dict" ]] && args+=(-dict="$here/$t.dict")
  log="$build/$t-${sanitizers//,/-}.log"
  echo "== $t (fuzzer,$sanitizers) ${args[*]}"
  rc=0
  "$bin_dir/$t" "${args[@]}" "$corpus" "${seeds[@]}" >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  done_line=$(grep -E '^Done [0-9]+ runs' "$log" | tail -1 || true)
  if [[ $rc -ne 0 ]]; then
    echo "== $t: FAILED (exit $rc) after ${execs:-?} executions; input in $build/artifacts/" >&2
    grep -E 'ERROR|SUMMARY|fuzz_|runtime error|#[0-9]+ 0x' "$log" | head -60 >&2 || true
    status=1
    summary+=("$t: FAILED after ${execs:-?} executions")
  else
    echo "== $t: ${done_line:-done}; ${execs:-?} executions, no crash"
    summary+=("$t: ${execs:-?} executions, no crash")
  fi
done
printf '%s\n' "${summary[@]}"
exit $status
