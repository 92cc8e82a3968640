#!/bin/bash
# Keep every checkpoint of a running `sinkscope train` job: copy RUN/checkpoint.pt to RUN/snapshots/ each time it
# changes (the lab overwrites it every train.ckpt_every steps), until RUN/final.json is newer than the last copy.
# `sinkscope train positions` reads the snapshots to follow where the sink is over training.
#   tools/keep_checkpoints.sh runs/NAME &      # started beside the training job
set -u
run=$1
mkdir -p "$run/snapshots"
last=""
while true; do
  if [ -f "$run/checkpoint.pt" ]; then
    m=$(stat -c %Y.%s "$run/checkpoint.pt")
    if [ "$m" != "$last" ]; then
      cp "$run/checkpoint.pt" "$run/snapshots/tmp.pt" && mv "$run/snapshots/tmp.pt" "$run/snapshots/ckpt-$(date +%s%N).pt"
      last=$m
    fi
    if [ -f "$run/final.json" ] && [ "$run/final.json" -nt "$run/checkpoint.pt" ]; then exit 0; fi
  fi
  sleep 5
done
