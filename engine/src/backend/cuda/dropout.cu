// Dropout masks on the GPU: the kernel side of `DropoutMask::tensor`
// (engine/src/backend/dropout.rs), whose `multiplier` is the CPU twin. Both must give the same
// bits: integer arithmetic decides keep or drop, and the kept value is `scale` rounded once.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}

// SplitMix64's finaliser.
__device__ __forceinline__ uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// One thread per element of a [rows, cols] mask; element i is row i / cols, column i % cols,
// so its counter is (first_row + row) · cols + column = first_row · cols + i.
template <typename T>
__device__ __forceinline__ void mask(uint64_t key, uint64_t first_row, uint64_t cols,
                                     uint32_t threshold, float scale, size_t n, T *out) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i >= n) {
    return;
  }
  uint64_t counter = first_row * cols + i;
  uint32_t top = (uint32_t)(mix(key + counter * GOLDEN) >> 40);
  out[i] = from_f32<T>(top < threshold ? 0.0f : scale);
}

#define MASK(NAME, T)                                                                        \
  extern "C" __global__ void NAME(uint64_t key, uint64_t first_row, uint64_t cols,          \
                                  uint32_t threshold, float scale, size_t n, T *out) {      \
    mask<T>(key, first_row, cols, threshold, scale, n, out);                                \
  }

MASK(dropout_mask_f32, float)
MASK(dropout_mask_bf16, __nv_bfloat16)
MASK(dropout_mask_f16, __half)
