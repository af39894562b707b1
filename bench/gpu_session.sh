# This session's GPU checks in one call (carry .whl): issue 19's step times under arrivals, then
# issue 21's build, GPU tests, TP on one card and the custom all-reduce's latency.
STEPS=mixed MIXED_LIMIT=170 bash bench/issue19_gpu.sh
STEPS="build tests tp car" TEST_LIMIT=110 TESTS="tests/test_distributed_custom_all_reduce.py tests/test_kernels_kv_fp8.py tests/test_kernels_gemm_fp8.py tests/test_device_block_tables.py" bash bench/issue21_gpu.sh
