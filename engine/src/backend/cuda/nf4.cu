// NF4 dequantization, the GPU side of `Nf4Tensor::dequantize` (engine/src/nf4_tensor.rs).
// It must equal the CPU reference (`nf4::dequantize_parts`) bit for bit, so every step is
// written with explicit round-to-nearest intrinsics: nvcc would otherwise contract the scale's
// multiply-add into one FMA, which rounds once instead of twice.
//
// `tables` holds the 16 NF4 levels followed by the 256 entries of bitsandbytes' dynamic code,
// uploaded from the Rust constants so there is one copy of each.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define BLOCK_SIZE 64
#define NESTED_BLOCK_SIZE 256
#define LEVELS 16

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}

// One thread per packed byte: its two weights share a block of 64 (an even size), so one
// block scale serves both.
template <typename T>
__device__ __forceinline__ void dequantize(const uint8_t *packed, const uint8_t *absmax,
                                           const float *nested, const float *tables,
                                           float offset, size_t n, T *out) {
  size_t pair = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  size_t first = 2 * pair;
  if (first >= n) {
    return;
  }
  size_t block = first / BLOCK_SIZE;
  const float *code = tables + LEVELS;
  float scale = __fadd_rn(__fmul_rn(code[absmax[block]], nested[block / NESTED_BLOCK_SIZE]), offset);
  uint8_t byte = packed[pair];
  out[first] = from_f32<T>(__fmul_rn(tables[byte >> 4], scale));
  if (first + 1 < n) {
    out[first + 1] = from_f32<T>(__fmul_rn(tables[byte & 0x0f], scale));
  }
}

#define DEQUANTIZE(NAME, T)                                                                 \
  extern "C" __global__ void NAME(const uint8_t *packed, const uint8_t *absmax,            \
                                  const float *nested, const float *tables, float offset,  \
                                  size_t n, T *out) {                                      \
    dequantize<T>(packed, absmax, nested, tables, offset, n, out);                         \
  }

DEQUANTIZE(nf4_dequantize_f32, float)
DEQUANTIZE(nf4_dequantize_bf16, __nv_bfloat16)
DEQUANTIZE(nf4_dequantize_f16, __half)
