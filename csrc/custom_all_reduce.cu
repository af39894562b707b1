// Custom all-reduce for tensor-parallel decode: the ranks' buffers are shared through CUDA IPC and
// each rank reads every peer's data directly, synchronised by flags in device memory.
//
// Why not NCCL: a decode step of the 130B model makes two all-reduces per layer of a few tens of
// KB each, where NCCL's launch and protocol latency dominate; and NCCL refuses ranks that share one
// GPU, which a custom all-reduce serves (each rank a process, all on one card).
//
// Every rank owns one region from cudaMalloc: [Signal | data | result]. A call copies the input
// into the rank's data area (stream-ordered), then one kernel:
//   one-shot (small messages): start barrier; every rank sums all ranks' data, in rank order 0..N-1
//     in float32, and writes the whole output; end barrier.
//   two-shot (larger): start barrier; rank r sums slice r of every rank's data into its result
//     area; mid barrier; every rank gathers slice s from rank s's result area; end barrier.
// The fixed summation order makes every rank's output identical bit for bit (and independent of
// which algorithm ran); it is not NCCL's order, so results differ from NCCL's in the last bits.
// The end barrier keeps a rank from overwriting its data area while peers may still read it.
//
// Barriers: block b of rank r writes the call's epoch into slot [b][r] of every peer's Signal and
// waits until its own slots [b][*] reach that epoch. Each block keeps its epoch in its own Signal
// and increments it per call, so nothing is reset between calls and a captured CUDA graph replays
// correctly (every rank launches the same grids in the same order, so epochs agree).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/all.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "custom_all_reduce.h"

namespace stepvox {
namespace {

constexpr int kMaxRanks = 8;
constexpr int kMaxBlocks = 64;
constexpr int kThreads = 512;
constexpr int kVecBytes = 16;

struct Signal {
  alignas(128) uint32_t start[kMaxBlocks][kMaxRanks];
  alignas(128) uint32_t mid[kMaxBlocks][kMaxRanks];
  alignas(128) uint32_t end[kMaxBlocks][kMaxRanks];
  alignas(128) uint32_t epoch[kMaxBlocks];
};

constexpr int64_t kSignalBytes = (sizeof(Signal) + 255) / 256 * 256;

struct Regions {
  char* base[kMaxRanks];
};

struct Context {
  int rank;
  int world;
  int device;
  int64_t capacity;  // bytes of the data area (and of the result area)
  int max_blocks;    // grid cap; kMaxBlocks unless lowered (ranks sharing one GPU in one process)
  char* local;
  Regions regions;
  std::vector<char*> opened;  // peers' regions mapped into this process
};

#define STEPVOX_CUDA_CHECK(expr)                                                              \
  do {                                                                                        \
    cudaError_t err_ = (expr);                                                                \
    TORCH_CHECK(err_ == cudaSuccess, "stepvox._C: ", #expr, " failed: ", cudaGetErrorString(err_)); \
  } while (0)

__device__ __forceinline__ void store_release(uint32_t* addr, uint32_t value) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(addr), "r"(value) : "memory");
}

__device__ __forceinline__ uint32_t load_acquire(const uint32_t* addr) {
  uint32_t value;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(value) : "l"(addr) : "memory");
  return value;
}

__device__ __forceinline__ Signal* signal_of(const Regions& regions, int rank) {
  return reinterpret_cast<Signal*>(regions.base[rank]);
}

__device__ __forceinline__ char* data_of(const Regions& regions, int rank) {
  return regions.base[rank] + kSignalBytes;
}

// kind: 0 start, 1 mid, 2 end. Every thread's earlier writes are made visible system-wide first.
__device__ void barrier(const Regions& regions, int rank, int world, uint32_t epoch, int kind) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x < world) {
    Signal* peer = signal_of(regions, threadIdx.x);
    Signal* self = signal_of(regions, rank);
    uint32_t* theirs = kind == 0 ? &peer->start[blockIdx.x][rank]
                       : kind == 1 ? &peer->mid[blockIdx.x][rank] : &peer->end[blockIdx.x][rank];
    uint32_t* mine = kind == 0 ? &self->start[blockIdx.x][threadIdx.x]
                     : kind == 1 ? &self->mid[blockIdx.x][threadIdx.x] : &self->end[blockIdx.x][threadIdx.x];
    store_release(theirs, epoch);
    while (static_cast<int32_t>(load_acquire(mine) - epoch) < 0) {  // wrap-safe: epochs run past 2^32
    }
  }
  __syncthreads();
}

__device__ __forceinline__ uint32_t next_epoch(const Regions& regions, int rank) {
  __shared__ uint32_t epoch;
  if (threadIdx.x == 0) {
    Signal* self = signal_of(regions, rank);
    epoch = self->epoch[blockIdx.x] + 1;
    self->epoch[blockIdx.x] = epoch;
  }
  __syncthreads();
  return epoch;
}

template <typename T>
struct Vec {
  static constexpr int kCount = kVecBytes / sizeof(T);
  T v[kCount];
};

template <typename T>
__device__ __forceinline__ void add_into(float* acc, const Vec<T>& x) {
#pragma unroll
  for (int j = 0; j < Vec<T>::kCount; ++j) acc[j] += static_cast<float>(x.v[j]);
}

template <typename T>
__device__ __forceinline__ Vec<T> sum_ranks(const Regions& regions, int world, int64_t offset, int64_t index) {
  float acc[Vec<T>::kCount] = {};
  for (int r = 0; r < world; ++r) {  // rank order: the same bits on every rank
    const Vec<T>* src = reinterpret_cast<const Vec<T>*>(data_of(regions, r) + offset);
    add_into(acc, src[index]);
  }
  Vec<T> out;
#pragma unroll
  for (int j = 0; j < Vec<T>::kCount; ++j) out.v[j] = static_cast<T>(acc[j]);
  return out;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) one_shot_kernel(Regions regions, int rank, int world, int64_t vecs,
                                                           Vec<T>* out) {
  uint32_t epoch = next_epoch(regions, rank);
  barrier(regions, rank, world, epoch, 0);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < vecs; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = sum_ranks<T>(regions, world, 0, i);
  barrier(regions, rank, world, epoch, 2);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) two_shot_kernel(Regions regions, int rank, int world, int64_t vecs,
                                                           int64_t capacity, Vec<T>* out) {
  uint32_t epoch = next_epoch(regions, rank);
  barrier(regions, rank, world, epoch, 0);
  int64_t slice = (vecs + world - 1) / world;
  int64_t lo = slice * rank, hi = min(vecs, lo + slice);
  Vec<T>* mine = reinterpret_cast<Vec<T>*>(data_of(regions, rank) + capacity);  // this rank's result area
  for (int64_t i = lo + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < hi; i += (int64_t)gridDim.x * blockDim.x)
    mine[i] = sum_ranks<T>(regions, world, 0, i);
  barrier(regions, rank, world, epoch, 1);
  // each element is read by the block of the same index that wrote it on its owner: the mid
  // barrier only orders block b of every rank with block b of the others
  for (int owner = 0; owner < world; ++owner) {
    const Vec<T>* theirs = reinterpret_cast<const Vec<T>*>(data_of(regions, owner) + capacity);
    int64_t begin = slice * owner, stop = min(vecs, begin + slice);
    for (int64_t i = begin + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < stop;
         i += (int64_t)gridDim.x * blockDim.x)
      out[i] = theirs[i];
  }
  barrier(regions, rank, world, epoch, 2);
}

// All-reduce of rows [M, H] fused with the residual add and RMSNorm that follow it in the layer:
// s = sum over ranks (rank order, float32, rounded to T); residual <- round(s + residual);
// out = round(residual * rsqrt(mean(residual^2) + eps) * weight). One block per row (strided).
template <typename T>
__global__ void __launch_bounds__(kThreads) add_rms_norm_kernel(Regions regions, int rank, int world, int64_t rows,
                                                               int64_t hidden, T* residual, const T* weight,
                                                               float eps, T* out) {
  uint32_t epoch = next_epoch(regions, rank);
  barrier(regions, rank, world, epoch, 0);
  __shared__ float partial[kThreads / 32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    float sumsq = 0.f;
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
      float acc = 0.f;
      for (int r = 0; r < world; ++r)  // rank order, as the plain all-reduce
        acc += static_cast<float>(reinterpret_cast<const T*>(data_of(regions, r))[row * hidden + c]);
      T total = static_cast<T>(acc);
      T updated = static_cast<T>(static_cast<float>(total) + static_cast<float>(residual[row * hidden + c]));
      residual[row * hidden + c] = updated;
      float u = static_cast<float>(updated);
      sumsq += u * u;
    }
    for (int offset = 16; offset > 0; offset >>= 1) sumsq += __shfl_xor_sync(0xffffffff, sumsq, offset);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sumsq;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += partial[w];
    float rstd = rsqrtf(total / static_cast<float>(hidden) + eps);
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x)
      out[row * hidden + c] = static_cast<T>(static_cast<float>(residual[row * hidden + c]) * rstd *
                                             static_cast<float>(weight[c]));
    __syncthreads();  // `partial` is reused by the next row
  }
  barrier(regions, rank, world, epoch, 2);
}

Context* as_context(int64_t handle) {
  TORCH_CHECK(handle != 0, "stepvox._C: the all-reduce context was disposed");
  return reinterpret_cast<Context*>(handle);
}

int blocks_for(int64_t vecs, int max_blocks) {
  int64_t blocks = (vecs + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, max_blocks)));
}

void check_input(const Context* ctx, const at::Tensor& inp, const at::Tensor& out) {
  TORCH_CHECK(inp.is_cuda() && inp.get_device() == ctx->device, "stepvox._C: input must be on cuda:", ctx->device);
  TORCH_CHECK(inp.is_contiguous() && out.is_contiguous(), "stepvox._C: input and output must be contiguous");
  TORCH_CHECK(inp.sizes() == out.sizes() && inp.scalar_type() == out.scalar_type(),
              "stepvox._C: output must match the input's shape and dtype");
  int64_t bytes = inp.numel() * inp.element_size();
  TORCH_CHECK(bytes <= ctx->capacity, "stepvox._C: ", bytes, " bytes exceed the buffer's ", ctx->capacity);
  TORCH_CHECK(bytes % kVecBytes == 0, "stepvox._C: the message must be a multiple of 16 bytes, got ", bytes);
}

// Copy the input into this rank's data area on `stream` (peers read it there); returns its bytes.
int64_t stage_input(Context* ctx, const at::Tensor& inp, cudaStream_t stream) {
  for (int r = 0; r < ctx->world; ++r) TORCH_CHECK(ctx->regions.base[r] != nullptr, "stepvox._C: peers not opened");
  int64_t bytes = inp.numel() * inp.element_size();
  STEPVOX_CUDA_CHECK(cudaMemcpyAsync(ctx->local + kSignalBytes, inp.data_ptr(), bytes, cudaMemcpyDeviceToDevice,
                                     stream));
  return bytes;
}

template <typename T>
void launch(Context* ctx, const at::Tensor& out, int64_t bytes, bool two_shot, cudaStream_t stream) {
  int64_t vecs = bytes / kVecBytes;
  auto* dst = reinterpret_cast<Vec<T>*>(out.data_ptr());
  if (two_shot)
    two_shot_kernel<T><<<blocks_for(vecs / ctx->world + 1, ctx->max_blocks), kThreads, 0, stream>>>(ctx->regions, ctx->rank,
                                                                                   ctx->world, vecs, ctx->capacity,
                                                                                   dst);
  else
    one_shot_kernel<T><<<blocks_for(vecs, ctx->max_blocks), kThreads, 0, stream>>>(ctx->regions, ctx->rank, ctx->world, vecs, dst);
  STEPVOX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

int64_t car_init(int64_t rank, int64_t world, int64_t capacity) {
  TORCH_CHECK(world >= 2 && world <= kMaxRanks, "stepvox._C: 2 to ", kMaxRanks, " ranks, got ", world);
  TORCH_CHECK(rank >= 0 && rank < world, "stepvox._C: rank ", rank, " outside 0..", world - 1);
  TORCH_CHECK(capacity > 0 && capacity % 256 == 0, "stepvox._C: capacity must be a positive multiple of 256");
  int device = 0;
  STEPVOX_CUDA_CHECK(cudaGetDevice(&device));
  int64_t region = kSignalBytes + 2 * capacity;
  char* local = nullptr;
  STEPVOX_CUDA_CHECK(cudaMalloc(&local, region));
  cudaError_t zeroed = cudaMemset(local, 0, region);
  if (zeroed == cudaSuccess) zeroed = cudaDeviceSynchronize();
  if (zeroed != cudaSuccess) {
    cudaFree(local);
    TORCH_CHECK(false, "stepvox._C: clearing the all-reduce buffer failed: ", cudaGetErrorString(zeroed));
  }
  auto* ctx = new Context();
  ctx->rank = static_cast<int>(rank);
  ctx->world = static_cast<int>(world);
  ctx->device = device;
  ctx->capacity = capacity;
  ctx->max_blocks = kMaxBlocks;
  ctx->local = local;
  for (int r = 0; r < kMaxRanks; ++r) ctx->regions.base[r] = nullptr;
  ctx->regions.base[ctx->rank] = ctx->local;
  return reinterpret_cast<int64_t>(ctx);
}

at::Tensor car_ipc_handle(int64_t handle) {
  Context* ctx = as_context(handle);
  cudaIpcMemHandle_t ipc;
  STEPVOX_CUDA_CHECK(cudaIpcGetMemHandle(&ipc, ctx->local));
  at::Tensor bytes = at::empty({static_cast<int64_t>(sizeof(ipc))}, at::dtype(at::kByte));
  std::memcpy(bytes.data_ptr(), &ipc, sizeof(ipc));
  return bytes;
}

void car_open_peers(int64_t handle, at::Tensor handles) {
  Context* ctx = as_context(handle);
  TORCH_CHECK(handles.dim() == 2 && handles.size(0) == ctx->world &&
                  handles.size(1) == static_cast<int64_t>(sizeof(cudaIpcMemHandle_t)) &&
                  handles.scalar_type() == at::kByte && handles.device().is_cpu(),
              "stepvox._C: handles must be uint8 [world, ", sizeof(cudaIpcMemHandle_t), "] on the CPU");
  at::Tensor host = handles.contiguous();
  for (int r = 0; r < ctx->world; ++r) {
    if (r == ctx->rank) continue;
    cudaIpcMemHandle_t ipc;
    std::memcpy(&ipc, host.data_ptr<uint8_t>() + r * sizeof(ipc), sizeof(ipc));
    void* peer = nullptr;
    STEPVOX_CUDA_CHECK(cudaIpcOpenMemHandle(&peer, ipc, cudaIpcMemLazyEnablePeerAccess));
    ctx->regions.base[r] = static_cast<char*>(peer);
    ctx->opened.push_back(static_cast<char*>(peer));
  }
}

void car_all_reduce(int64_t handle, at::Tensor inp, at::Tensor out, bool two_shot) {
  Context* ctx = as_context(handle);
  check_input(ctx, inp, out);
  const c10::cuda::CUDAGuard guard(inp.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  int64_t bytes = stage_input(ctx, inp, stream);
  switch (inp.scalar_type()) {
    case at::kFloat: launch<float>(ctx, out, bytes, two_shot, stream); break;
    case at::kHalf: launch<__half>(ctx, out, bytes, two_shot, stream); break;
    case at::kBFloat16: launch<__nv_bfloat16>(ctx, out, bytes, two_shot, stream); break;
    default: TORCH_CHECK(false, "stepvox._C: all-reduce of ", inp.scalar_type(), " is not supported");
  }
}

void car_all_reduce_add_rms_norm(int64_t handle, at::Tensor inp, at::Tensor residual, at::Tensor weight, double eps,
                                 at::Tensor out) {
  Context* ctx = as_context(handle);
  check_input(ctx, inp, out);
  TORCH_CHECK(inp.dim() == 2 && residual.sizes() == inp.sizes() && residual.scalar_type() == inp.scalar_type() &&
                  residual.is_contiguous(),
              "stepvox._C: residual must be a contiguous [rows, hidden] of the input's dtype");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == inp.size(1) && weight.scalar_type() == inp.scalar_type() &&
                  weight.is_contiguous(),
              "stepvox._C: weight must be [hidden] of the input's dtype");
  const c10::cuda::CUDAGuard guard(inp.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  int64_t bytes = stage_input(ctx, inp, stream);
  int64_t rows = inp.size(0), hidden = inp.size(1);
  int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, ctx->max_blocks)));
#define STEPVOX_LAUNCH_NORM(T)                                                                           \
  add_rms_norm_kernel<T><<<blocks, kThreads, 0, stream>>>(                                               \
      ctx->regions, ctx->rank, ctx->world, rows, hidden, reinterpret_cast<T*>(residual.data_ptr()),      \
      reinterpret_cast<const T*>(weight.data_ptr()), static_cast<float>(eps), reinterpret_cast<T*>(out.data_ptr()))
  switch (inp.scalar_type()) {
    case at::kFloat: STEPVOX_LAUNCH_NORM(float); break;
    case at::kHalf: STEPVOX_LAUNCH_NORM(__half); break;
    case at::kBFloat16: STEPVOX_LAUNCH_NORM(__nv_bfloat16); break;
    default: TORCH_CHECK(false, "stepvox._C: all-reduce of ", inp.scalar_type(), " is not supported");
  }
#undef STEPVOX_LAUNCH_NORM
  STEPVOX_CUDA_CHECK(cudaGetLastError());
}

int64_t car_capacity(int64_t handle) { return as_context(handle)->capacity; }

// Ranks that live in one process (one context, e.g. a benchmark driving every rank from its own
// stream) cannot open each other's IPC handles; they exchange plain device addresses instead.
int64_t car_region_address(int64_t handle) { return reinterpret_cast<int64_t>(as_context(handle)->local); }

void car_set_peer_addresses(int64_t handle, at::Tensor addresses) {
  Context* ctx = as_context(handle);
  TORCH_CHECK(addresses.dim() == 1 && addresses.size(0) == ctx->world && addresses.scalar_type() == at::kLong &&
                  addresses.device().is_cpu(),
              "stepvox._C: addresses must be int64 [world] on the CPU");
  at::Tensor host = addresses.contiguous();
  TORCH_CHECK(host.data_ptr<int64_t>()[ctx->rank] == reinterpret_cast<int64_t>(ctx->local),
              "stepvox._C: address ", ctx->rank, " must be this rank's own region");
  for (int r = 0; r < ctx->world; ++r) ctx->regions.base[r] = reinterpret_cast<char*>(host.data_ptr<int64_t>()[r]);
}

// Every rank's blocks spin in the barriers until all ranks' blocks arrive, so ranks sharing one
// GPU's SMs concurrently need world x blocks co-resident: the caller lowers the cap to fit.
void car_set_max_blocks(int64_t handle, int64_t blocks) {
  TORCH_CHECK(blocks >= 1 && blocks <= kMaxBlocks, "stepvox._C: max blocks must be 1..", kMaxBlocks);
  as_context(handle)->max_blocks = static_cast<int>(blocks);
}

void car_dispose(int64_t handle) {
  Context* ctx = as_context(handle);
  cudaDeviceSynchronize();  // no kernel of this context may still run
  for (char* peer : ctx->opened) cudaIpcCloseMemHandle(peer);
  cudaFree(ctx->local);
  delete ctx;
}

}  // namespace stepvox
