// A mixed serving batch's LoRA products in two launches per projection, whatever the number
// of adapters (Punica's SGMV, in its simplest form): `shrink` computes each row's x · Aᵀ with
// its sequence's A, `expand` adds scale · (x · Aᵀ) · Bᵀ onto the base output. The sequences'
// rows, weights, ranks and scales travel in the launch's parameters (`Table`), so nothing is
// uploaded per projection. The CPU twin is the candle-op path in batch.rs, which the GPU
// tests compare against.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define MAX_SEGMENTS 32

// One sequence's rows and its adapter pair: A [rank, in] and Bᵀ [rank, out], row-major, in
// the batch's dtype. Mirrors `Segment` in kernels.rs.
struct Segment {
  const void *a;
  const void *b_t;
  int32_t start;
  int32_t end;
  int32_t rank;
  float scale;
};

struct Table {
  Segment segments[MAX_SEGMENTS];
  int32_t count;
};

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}

// The segment holding `row`, or -1 (a base-model row).
__device__ __forceinline__ int segment_of(const Table &table, int row) {
  for (int s = 0; s < table.count; ++s) {
    if (row >= table.segments[s].start && row < table.segments[s].end) {
      return s;
    }
  }
  return -1;
}

// One block per row; each warp takes ranks j = warp, warp + warps, ... and reduces
// x[row] · A[j] across its lanes. `t` is [rows, max_rank] f32.
template <typename T>
__device__ void shrink(const T *x, int32_t in_dim, const Table &table, float *t,
                       int32_t max_rank) {
  int row = blockIdx.x;
  int s = segment_of(table, row);
  if (s < 0) {
    return;
  }
  const Segment &seg = table.segments[s];
  const T *a = (const T *)seg.a;
  const T *x_row = x + (size_t)row * in_dim;
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int j = warp; j < seg.rank; j += warps) {
    const T *a_row = a + (size_t)j * in_dim;
    float sum = 0.0f;
    for (int k = lane; k < in_dim; k += 32) {
      sum += to_f32<T>(x_row[k]) * to_f32<T>(a_row[k]);
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      sum += __shfl_down_sync(0xffffffff, sum, offset);
    }
    if (lane == 0) {
      t[(size_t)row * max_rank + j] = sum;
    }
  }
}

// Grid (rows, ⌈out / block⌉): y_out[row, o] = y[row, o] + scale · Σ_j t[row, j] · Bᵀ[j, o],
// or y[row, o] for a base-model row.
template <typename T>
__device__ void expand(const float *t, int32_t max_rank, const T *y, int32_t out_dim,
                       const Table &table, T *y_out) {
  int row = blockIdx.x;
  int o = blockIdx.y * blockDim.x + threadIdx.x;
  if (o >= out_dim) {
    return;
  }
  size_t at = (size_t)row * out_dim + o;
  int s = segment_of(table, row);
  if (s < 0) {
    y_out[at] = y[at];
    return;
  }
  const Segment &seg = table.segments[s];
  const T *b_t = (const T *)seg.b_t;
  const float *t_row = t + (size_t)row * max_rank;
  float sum = 0.0f;
  for (int j = 0; j < seg.rank; ++j) {
    sum += t_row[j] * to_f32<T>(b_t[(size_t)j * out_dim + o]);
  }
  y_out[at] = from_f32<T>(to_f32<T>(y[at]) + seg.scale * sum);
}

#define LORA(SUFFIX, T)                                                                      \
  extern "C" __global__ void lora_shrink_##SUFFIX(const T *x, int32_t in_dim, Table table,  \
                                                  float *t, int32_t max_rank) {             \
    shrink<T>(x, in_dim, table, t, max_rank);                                               \
  }                                                                                          \
  extern "C" __global__ void lora_expand_##SUFFIX(const float *t, int32_t max_rank,         \
                                                  const T *y, int32_t out_dim, Table table, \
                                                  T *y_out) {                               \
    expand<T>(t, max_rank, y, out_dim, table, y_out);                                       \
  }

LORA(f32, float)
LORA(bf16, __nv_bfloat16)
LORA(f16, __half)
