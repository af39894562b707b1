// stepvox._C's torch ops (torch.ops.stepvox.*), loaded with torch.ops.load_library.
#include <torch/library.h>

#include "custom_all_reduce.h"

TORCH_LIBRARY(stepvox, m) {
  m.def("car_init(int rank, int world, int capacity) -> int", &stepvox::car_init);
  m.def("car_ipc_handle(int handle) -> Tensor", &stepvox::car_ipc_handle);
  m.def("car_open_peers(int handle, Tensor handles) -> ()", &stepvox::car_open_peers);
  m.def("car_all_reduce(int handle, Tensor inp, Tensor(a!) out, bool two_shot) -> ()", &stepvox::car_all_reduce);
  m.def("car_all_reduce_add_rms_norm(int handle, Tensor inp, Tensor(a!) residual, Tensor weight, float eps, "
        "Tensor(b!) out) -> ()",
        &stepvox::car_all_reduce_add_rms_norm);
  m.def("car_capacity(int handle) -> int", &stepvox::car_capacity);
  m.def("car_region_address(int handle) -> int", &stepvox::car_region_address);
  m.def("car_set_peer_addresses(int handle, Tensor addresses) -> ()", &stepvox::car_set_peer_addresses);
  m.def("car_set_max_blocks(int handle, int blocks) -> ()", &stepvox::car_set_max_blocks);
  m.def("car_dispose(int handle) -> ()", &stepvox::car_dispose);
}
