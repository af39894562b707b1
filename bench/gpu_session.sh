# This session's last GPU call (carry .whl): issue 21's build, the custom all-reduce GPU tests, TP=2/4
# on one card against TP=1 (bf16 first, then fp32), the custom all-reduce's latency per size.
STEPS="build tests tp car" TEST_LIMIT=70 TESTS="tests/test_distributed_custom_all_reduce.py" \
  TP_LIMIT=120 TP_ARGS="--dtypes bfloat16,float32 --variants tp2+car,tp4+car" CAR_LIMIT=40 bash bench/issue21_gpu.sh
