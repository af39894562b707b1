# Issue 21's GPU checks (carry .whl), run as STEPS="build tests car" then STEPS="tp kernels" on one warm
# machine: build stepvox._C, GPU tests of the custom all-reduce and the FP8 kernels, its latency per
# message size, TP=2/4 on the one card against TP=1, every kernel op (stepvox bench kernels). Logs in $OUT.
source bench/device_env.sh
start=$(date +%s)
t() { echo "== $1 at $(( $(date +%s) - start )) s"; }
for step in ${STEPS:-build tests car tp kernels}; do
  t $step
  case $step in
    build) ( cmake -S . -B build -DPython3_EXECUTABLE=$(which python3) >/dev/null && cmake --build build -j16 ) > $OUT/build.log 2>&1
           echo "rc=$?"; tail -4 $OUT/build.log; ls -la python/stepvox/_C.so ;;
    tests) timeout ${TEST_LIMIT:-240} python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS:-tests/test_distributed_custom_all_reduce.py tests/test_kernels_kv_fp8.py tests/test_kernels_gemm_fp8.py} > $OUT/tests.log 2>&1
           echo "rc=$?"; tail -15 $OUT/tests.log ;;
    car) (cd bench && timeout ${CAR_LIMIT:-50} python3 custom_all_reduce.py ${CAR_ARGS:---worlds 2,8 --sizes 1024,16384,262144,1048576,8388608,67108864}) > $OUT/car.log 2>&1; echo "rc=$?"; tail -45 $OUT/car.log ;;
    tp) (cd bench && timeout ${TP_LIMIT:-130} python3 tp_one_gpu.py --tokens 16 ${TP_ARGS:-}) > $OUT/tp.log 2>&1; echo "rc=$?"; tail -22 $OUT/tp.log ;;
    kernels) timeout 120 stepvox bench kernels --json $OUT/kernels.json > $OUT/kernels.log 2>&1; echo "rc=$?"; tail -28 $OUT/kernels.log ;;
  esac
done
t end
