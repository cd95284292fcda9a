// Helpers shared by the CUDA kernels of attnfx._C: warp and block sums, and copying a host
// index list to the device.
#pragma once

#include "common.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>

namespace attnfx::cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ inline T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
template <typename T>
__device__ inline T block_sum(T v) {
  __shared__ T partial[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < blockDim.x / kWarp ? partial[lane] : T(0);
  v = warp_sum(v);
  __syncthreads();              // partial is reused by the next call
  return v;
}

// A host list of indices as an int64 tensor on `device`.
inline at::Tensor to_device(const std::vector<int64_t>& values, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(at::kLong));
  if (!values.empty()) std::memcpy(host.mutable_data_ptr<int64_t>(), values.data(), values.size() * sizeof(int64_t));
  return host.to(device);
}

inline unsigned blocks_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "attnfx._C: ", items, " items exceed one CUDA grid");
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

}  // namespace attnfx::cuda
