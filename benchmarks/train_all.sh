#!/bin/bash
# Trains every method's weights for the default model on equal footing (#33, item 6): the same
# broad data (3000 file prompts + 1000 self-written requests) and the same rule, until validation
# stops improving: the peak lr held, cut to 0.3x after 3 validations without improvement, and
# stopped at the third such plateau (`--schedule plateau`); 4 epochs at most, a ceiling the
# plateaus are expected to end well before (the report says which run hit it). FIRP first, the
# method the harness is built around. Hours on a small CPU, so it is restartable: a folder with
# config.json is done and skipped, an unfinished one resumes from its checkpoint.pt.
# Usage: nohup bash benchmarks/train_all.sh [OUT_DIR [METHOD ...]] >> train_all.log 2>&1 &
# (methods: firp medusa sps eagle; all four, in that order, when none is named)
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/plateau}
shift || true
ONLY=" ${*:-firp medusa sps eagle} "
D="--data ../shared/data/gsm8k/train.jsonl ../shared/data/boolq/dev.jsonl --limit 3000 --self-prompts 1000 --epochs 4 --schedule plateau"
train() {
  name=$1; shift
  case "$ONLY" in *" $name "*) ;; *) return ;; esac
  if [ -f "$OUT/$name/config.json" ]; then echo "skip $name (done)"; return; fi
  echo "=== $name $(date -u)"
  python -m harness train "$@" $D --out "$OUT/$name" >> "$OUT/$name.log" 2>&1
  echo "=== $name rc=$? $(date -u)"
}
mkdir -p "$OUT"
train firp firp --option layers=20 --option K=3 --option input=prev --option step_weights=1,0.7,0.5
train medusa medusa
train sps sps --option layers=2
train eagle eagle  # last: its unrolled draft levels make it the slowest by far
