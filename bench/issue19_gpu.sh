# Issue 19's GPU run (carry .whl): the engine's step time under arrivals with mixed steps as graph
# parts vs one eager joint step (bench/mixed_steps.py), then concurrent real-time TTS streams
# (bench/streams.py: sweep, 60 s hold, Poisson arrivals). Logs and JSON in $OUT.
source bench/device_env.sh
start=$(date +%s)
t() { echo "== $1 at $(( $(date +%s) - start )) s"; }
for step in ${STEPS:-mixed streams}; do
  t $step
  case $step in
    mixed) (cd bench && timeout ${MIXED_LIMIT:-170} python3 mixed_steps.py) > $OUT/mixed.log 2>&1; echo "rc=$?"; tail -12 $OUT/mixed.log ;;
    streams) timeout ${STREAMS_LIMIT:-400} python3 bench/streams.py --folders /tmp/streams-folders ${STREAMS_ARGS:---levels 1,16,32,64,100,128 --budget-s 360} --json $OUT/streams.json > $OUT/streams.log 2>&1
             echo "rc=$?"; tail -40 $OUT/streams.log ;;
  esac
done
t end
