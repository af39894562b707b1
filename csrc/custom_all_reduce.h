// The custom all-reduce's host functions (custom_all_reduce.cu), registered as torch ops in ops.cpp.
// A context is an opaque handle (int64) owned by the Python side (engine/distributed/custom_all_reduce.py).
#pragma once

#include <torch/all.h>

namespace stepvox {

int64_t car_init(int64_t rank, int64_t world, int64_t capacity);
at::Tensor car_ipc_handle(int64_t handle);
void car_open_peers(int64_t handle, at::Tensor handles);
void car_all_reduce(int64_t handle, at::Tensor inp, at::Tensor out, bool two_shot);
void car_all_reduce_add_rms_norm(int64_t handle, at::Tensor inp, at::Tensor residual, at::Tensor weight, double eps,
                                 at::Tensor out);
int64_t car_capacity(int64_t handle);
int64_t car_region_address(int64_t handle);
void car_set_peer_addresses(int64_t handle, at::Tensor addresses);
void car_set_max_blocks(int64_t handle, int64_t blocks);
void car_dispose(int64_t handle);

}  // namespace stepvox
