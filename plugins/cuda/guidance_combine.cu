// CUDA implementation of samg::GuidanceCombine v1 (see guidance_combine.h).
//
// Grid: blockIdx.y is the sample, blockIdx.x/threadIdx.x stride over the sample's locations, so a
// block's partial energy sum belongs to one sample (one atomicAdd per block). Consecutive threads
// handle consecutive inner positions: every channel's load is coalesced.
//
// NVRTC (the TensorRT plugin compiles this file through CuPy: samg/build/plugin.py) builds the
// kernels only: no host headers or launch code, and a named namespace so that the plugin can look
// the kernels up by name. nvcc builds everything, the kernels in an anonymous namespace.
#ifdef __CUDACC_RTC__
typedef long int int64_t;  // glibc's definition on LP64: NVRTC has no <stdint.h>
#define SAMG_KERNEL_NAMESPACE samg_combine_kernels
#else
#include "guidance_combine.h"

#include <cuda_runtime.h>
#define SAMG_KERNEL_NAMESPACE
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace SAMG_KERNEL_NAMESPACE {

constexpr int kThreads = 256;
constexpr double kEpsilon = 1e-12;
constexpr float kSideWeight = 0.21194155761708547f;   // e^-1 / (1 + 2 e^-1)
constexpr float kCenterWeight = 0.5761168847658291f;  // 1 / (1 + 2 e^-1)

__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ float load(__half v) { return __half2float(v); }
__device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T store(float v);
template <> __device__ __forceinline__ float store<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

struct Shape {
  int64_t outer, channels, inner, height, width, positions;  // positions = outer * inner, per sample
};

__device__ __forceinline__ int64_t data_base(const Shape& s, int64_t b, int64_t p) {
  const int64_t o = p / s.inner, i = p - o * s.inner;
  return ((b * s.outer + o) * s.channels) * s.inner + i;
}

__device__ __forceinline__ int64_t reflect(int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * n - 2 - i : i); }

// Non-negative floats order like their bit patterns read as unsigned ints: atomicMax on the bits.
__device__ __forceinline__ void atomic_max_non_negative(float* address, float value) {
  atomicMax(reinterpret_cast<unsigned int*>(address), __float_as_uint(value));
}

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// `value` reduced with `op` over the block (blockDim.x == kThreads; `identity` is op's neutral
// value): warp shuffles, then one value per warp through shared memory. Valid in thread 0.
template <typename Op>
__device__ __forceinline__ float block_reduce(float value, Op op, float identity) {
  for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_down_sync(0xffffffffu, value, offset));
  __shared__ float warp_values[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_values[threadIdx.x >> 5] = value;
  __syncthreads();
  float v = identity;
  if (threadIdx.x < 32) {
    v = threadIdx.x < blockDim.x / 32 ? warp_values[threadIdx.x] : identity;
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  return v;
}

// The energy's scale s: the sample's max |c - u|, 1 where that is 0 (c == u).
__device__ __forceinline__ float energy_scale(const float* peaks, int64_t b) { return peaks[b] > 0.0f ? peaks[b] : 1.0f; }

// peaks[b] = max |c - u| over sample b (peaks zeroed before). fmaxf skips a NaN; the sample's energy
// is NaN anyway then. An Inf makes the peak Inf (its own (c - u) / s is then NaN).
template <typename T>
__global__ void peak_kernel(const T* __restrict__ u, const T* __restrict__ c, float* __restrict__ peaks, Shape s) {
  const int64_t b = blockIdx.y;
  float local = 0.0f;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < s.positions;
       p += (int64_t)gridDim.x * blockDim.x) {
    const int64_t base = data_base(s, b, p);
    for (int64_t ch = 0; ch < s.channels; ++ch)
      local = fmaxf(local, fabsf(load(c[base + ch * s.inner]) - load(u[base + ch * s.inner])));
  }
  const float block_peak = block_reduce(local, MaxOp(), 0.0f);
  if (threadIdx.x == 0) atomic_max_non_negative(&peaks[b], block_peak);
}

// E(p) = sum_c ((c - u) / s)^2 so that squares and sums stay in float32 range; eps is scaled alike
// in `membership`, so the normalized energy is the spec's.
template <typename T>
__global__ void energy_kernel(const T* __restrict__ u, const T* __restrict__ c, const float* __restrict__ peaks,
                              float* __restrict__ energy, double* __restrict__ sums, Shape s) {
  const int64_t b = blockIdx.y;
  const float scale = energy_scale(peaks, b);
  float local = 0.0f;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < s.positions;
       p += (int64_t)gridDim.x * blockDim.x) {
    const int64_t base = data_base(s, b, p);
    float e = 0.0f;
    for (int64_t ch = 0; ch < s.channels; ++ch) {
      const float d = (load(c[base + ch * s.inner]) - load(u[base + ch * s.inner])) / scale;
      e += d * d;
    }
    energy[b * s.positions + p] = e;
    local += e;
  }
  const float block_sum = block_reduce(local, SumOp(), 0.0f);
  if (threadIdx.x == 0) atomicAdd(&sums[b], static_cast<double>(block_sum));
}

// Ê = E / (mean E + (eps / s) / s): the spec's E0 / (mean E0 + eps) for the energy E0 = s^2 E of
// c - u itself (in double: nothing overflows or underflows that matters).
__device__ __forceinline__ float membership(float e, const double* sums, const float* peaks, int64_t b,
                                            const Shape& s, float tau, float k) {
  const double scale = energy_scale(peaks, b);
  const double mean = sums[b] / static_cast<double>(s.positions);
  const float inverse_mean = static_cast<float>(1.0 / (mean + kEpsilon / scale / scale));
  return 1.0f / (1.0f + expf(-(k * (e * inverse_mean - tau))));
}

__global__ void membership_kernel(const float* __restrict__ energy, const double* __restrict__ sums,
                                  const float* __restrict__ peaks, float* __restrict__ member, Shape s, float tau,
                                  float k) {
  const int64_t b = blockIdx.y;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < s.positions;
       p += (int64_t)gridDim.x * blockDim.x)
    member[b * s.positions + p] = membership(energy[b * s.positions + p], sums, peaks, b, s, tau, k);
}

// Separable 3x3 on the membership map, same order of operations as the CPU kernel
// (vertical into a column value, then horizontal).
__device__ __forceinline__ float smoothed(const float* m, int64_t p, const Shape& s) {
  const int64_t plane_size = s.height * s.width;
  const int64_t plane_start = p - p % plane_size;
  const int64_t y = (p - plane_start) / s.width, x = (p - plane_start) % s.width;
  const float* above = m + plane_start + reflect(y - 1, s.height) * s.width;
  const float* here = m + plane_start + y * s.width;
  const float* below = m + plane_start + reflect(y + 1, s.height) * s.width;
  auto column = [&](int64_t xx) { return kSideWeight * (above[xx] + below[xx]) + kCenterWeight * here[xx]; };
  return kSideWeight * (column(reflect(x - 1, s.width)) + column(reflect(x + 1, s.width))) + kCenterWeight * column(x);
}

template <typename T, bool kSmooth>
__global__ void combine_kernel(const T* __restrict__ u, const T* __restrict__ c, const float* __restrict__ scales,
                               T* __restrict__ out, const float* __restrict__ map, const double* __restrict__ sums,
                               const float* __restrict__ peaks, Shape s, float tau, float k) {
  const int64_t b = blockIdx.y;
  const float w_min = scales[2 * b], w_max = scales[2 * b + 1];
  const float span = w_max - w_min;
  const float* sample_map = map + b * s.positions;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < s.positions;
       p += (int64_t)gridDim.x * blockDim.x) {
    // Smoothing reads the membership map; otherwise `map` is the energy and membership is fused here.
    const float m = kSmooth ? smoothed(sample_map, p, s) : membership(sample_map[p], sums, peaks, b, s, tau, k);
    const float w = w_max - span * m;
    const int64_t base = data_base(s, b, p);
    for (int64_t ch = 0; ch < s.channels; ++ch) {
      const int64_t at = base + ch * s.inner;
      const float uv = load(u[at]);
      out[at] = store<T>(uv + w * (load(c[at]) - uv));
    }
  }
}

#ifndef __CUDACC_RTC__
constexpr size_t kAlign = 256;

size_t align_up(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

struct Workspace {
  double* sums;
  float* peaks;
  float* energy;
  float* member;
};

size_t workspace_bytes(const samg_combine_layout& L, int smooth, Workspace* parts, void* base) {
  const size_t map_bytes = align_up(sizeof(float) * static_cast<size_t>(L.batch * L.outer * L.inner));
  const size_t sums_bytes = align_up(sizeof(double) * static_cast<size_t>(L.batch));
  const size_t peaks_bytes = align_up(sizeof(float) * static_cast<size_t>(L.batch));
  if (parts) {
    char* p = static_cast<char*>(base);
    parts->sums = reinterpret_cast<double*>(p);
    parts->peaks = reinterpret_cast<float*>(p + sums_bytes);
    parts->energy = reinterpret_cast<float*>(p + sums_bytes + peaks_bytes);
    parts->member = smooth ? reinterpret_cast<float*>(p + sums_bytes + peaks_bytes + map_bytes) : nullptr;
  }
  return sums_bytes + peaks_bytes + map_bytes * (smooth ? 2 : 1);
}

template <typename T>
const char* launch(const void* u_raw, const void* c_raw, const float* scales, void* out_raw,
                   const samg_combine_layout& L, const samg_combine_params& P, const Workspace& ws,
                   cudaStream_t stream) {
  const T* u = static_cast<const T*>(u_raw);
  const T* c = static_cast<const T*>(c_raw);
  T* out = static_cast<T*>(out_raw);
  const Shape s{L.outer, L.channels, L.inner, L.height, L.width, L.outer * L.inner};
  const int64_t blocks_needed = (s.positions + kThreads - 1) / kThreads;
  const dim3 grid(static_cast<unsigned>(blocks_needed < 4096 ? blocks_needed : 4096), static_cast<unsigned>(L.batch));
  cudaError_t status = cudaMemsetAsync(ws.sums, 0, sizeof(double) * static_cast<size_t>(L.batch), stream);
  if (status != cudaSuccess) return cudaGetErrorString(status);
  status = cudaMemsetAsync(ws.peaks, 0, sizeof(float) * static_cast<size_t>(L.batch), stream);
  if (status != cudaSuccess) return cudaGetErrorString(status);
  peak_kernel<T><<<grid, kThreads, 0, stream>>>(u, c, ws.peaks, s);
  energy_kernel<T><<<grid, kThreads, 0, stream>>>(u, c, ws.peaks, ws.energy, ws.sums, s);
  if (P.smooth == 3) {
    membership_kernel<<<grid, kThreads, 0, stream>>>(ws.energy, ws.sums, ws.peaks, ws.member, s, P.tau,
                                                     P.sharpness);
    combine_kernel<T, true><<<grid, kThreads, 0, stream>>>(u, c, scales, out, ws.member, ws.sums, ws.peaks, s,
                                                             P.tau, P.sharpness);
  } else {
    combine_kernel<T, false><<<grid, kThreads, 0, stream>>>(u, c, scales, out, ws.energy, ws.sums, ws.peaks, s,
                                                              P.tau, P.sharpness);
  }
  status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

#endif  // !__CUDACC_RTC__

}  // namespace SAMG_KERNEL_NAMESPACE

#ifndef __CUDACC_RTC__
extern "C" size_t samg_guidance_combine_cuda_workspace_size(const int64_t* dims, int rank,
                                                           const samg_combine_params* params) {
  samg_combine_layout layout;
  if (samg_combine_layout_from_dims(dims, rank, params, &layout)) return 0;
  return workspace_bytes(layout, params->smooth == 3, nullptr, nullptr);
}

extern "C" const char* samg_guidance_combine_cuda(const void* u, const void* c, const float* scales, void* out,
                                                  samg_dtype dtype, const int64_t* dims, int rank,
                                                  const samg_combine_params* params, void* workspace,
                                                  size_t workspace_size, void* stream) {
  samg_combine_layout layout;
  if (const char* problem = samg_combine_layout_from_dims(dims, rank, params, &layout)) return problem;
  if (layout.batch > 65535) return "batch larger than 65535 is not supported by the CUDA kernel";
  if (layout.batch == 0 || layout.outer * layout.inner == 0 || layout.channels == 0) return nullptr;
  Workspace parts;
  if (workspace_size < workspace_bytes(layout, params->smooth == 3, &parts, workspace))
    return "workspace too small: allocate samg_guidance_combine_cuda_workspace_size() bytes";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case SAMG_DTYPE_FLOAT32: return launch<float>(u, c, scales, out, layout, *params, parts, s);
    case SAMG_DTYPE_FLOAT16: return launch<__half>(u, c, scales, out, layout, *params, parts, s);
    case SAMG_DTYPE_BFLOAT16: return launch<__nv_bfloat16>(u, c, scales, out, layout, *params, parts, s);
  }
  return "unsupported dtype (float32, float16 or bfloat16)";
}
#endif  // !__CUDACC_RTC__
