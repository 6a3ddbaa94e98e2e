"""CUDA source of the GuidanceCombine kernels that the TensorRT plugin launches (via CuPy).

The math is samg-v1 from docs/guidance-op.md. Predictions are viewed as `[B, O, C, I]`: channels
`C` at `channel_axis`, `O` = the dims between batch and channels, `I` = the dims after them, so one
set of kernels serves `[B,C,H,W]`, `[B,C,F,H,W]` and `[B,F,C,H,W]`. The per-location buffers are
`[B, P]` with `P = O * I` positions per sample, whose last two dims are always (H, W), so smoothing
runs on `B * P / (H * W)` planes of H x W.

Stages (one launch each, all on TensorRT's stream; float32 throughout):
  sample_peak D[b]     = max |c - u| over the sample (zeroed first; many blocks per sample, atomic
                         max); the energy's scale s = D[b], or 1 where D[b] = 0
  energy      E[b,p]   = sum_c ((c - u) / s)^2   (no square or sum overflows)
  normalizer  N[b]     = sum_p E[b,p] / P + (eps / s) / s   (the spec's mean E0 + eps for the energy
                         E0 = s^2 E of c - u itself, divided by s^2: Ê is the spec's)
  membership  M[b,p]   = sigmoid(k * (E / N - tau))
  smooth_rows / smooth_cols (optional): 1-D [a, 1-2a, a] along W then H, reflect padding
  combine     out      = u + (w_max - (w_max - w_min) * M) * (c - u), stored in the input dtype
"""

from __future__ import annotations

KERNEL_SOURCE = r"""
#include <cuda_fp16.h>

__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const __half* p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, long long i, float v) { p[i] = __float2half_rn(v); }

// Mirror without repeating the edge: -1 -> 1, n -> n - 2 (n >= 2 is checked on the host).
__device__ __forceinline__ long long reflect(long long i, long long n) {
    if (i < 0) return -i;
    if (i >= n) return 2 * n - 2 - i;
    return i;
}

// The energy's scale s: the sample's max |c - u|, 1 where that is 0 (c == u).
__device__ __forceinline__ float energy_scale(const float* peaks, long long b) {
    return peaks[b] > 0.f ? peaks[b] : 1.f;
}

// Grid (blocks, B): the blocks of row y stride over sample y; blockDim.x a power of two <= 1024.
// peaks[] zeroed before: non-negative floats order like their bits read as unsigned ints, so an
// atomicMax on the bits keeps the largest. fmaxf skips a NaN (the sample's energy is NaN anyway);
// an Inf makes the peak Inf (its own (c - u) / s is then NaN).
template <typename T>
__device__ void sample_peak_impl(const T* u, const T* c, float* peaks, long long per_sample) {
    extern __shared__ float partial[];
    const long long base = blockIdx.y * per_sample;
    float acc = 0.f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < per_sample;
         i += (long long)gridDim.x * blockDim.x)
        acc = fmaxf(acc, fabsf(load(c, base + i) - load(u, base + i)));
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) partial[threadIdx.x] = fmaxf(partial[threadIdx.x], partial[threadIdx.x + stride]);
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicMax(reinterpret_cast<unsigned int*>(peaks + blockIdx.y), __float_as_uint(partial[0]));
}

template <typename T>
__device__ void energy_impl(const T* u, const T* c, const float* peaks, float* energy,
                            long long B, long long O, long long C, long long I) {
    long long positions = O * I;
    long long total = B * positions;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        long long b = idx / positions, p = idx % positions;
        long long o = p / I, i = p % I;
        long long base = ((b * O + o) * C) * I + i;
        float scale = energy_scale(peaks, b);
        float acc = 0.f;
        for (long long ch = 0; ch < C; ++ch) {
            float d = (load(c, base + ch * I) - load(u, base + ch * I)) / scale;
            acc += d * d;
        }
        energy[idx] = acc;
    }
}

template <typename T>
__device__ void combine_impl(const T* u, const T* c, const float* scales, const float* member,
                             T* out, long long B, long long O, long long C, long long I) {
    long long per_sample = O * C * I;
    long long total = B * per_sample;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        long long b = idx / per_sample, r = idx % per_sample;
        long long o = r / (C * I), i = r % I;
        float w_min = scales[2 * b], w_max = scales[2 * b + 1];
        float w = w_max - (w_max - w_min) * member[b * O * I + o * I + i];
        float uu = load(u, idx);
        store(out, idx, uu + w * (load(c, idx) - uu));
    }
}

extern "C" {

__global__ void sample_peak_f32(const float* u, const float* c, float* peaks, long long per_sample) {
    sample_peak_impl(u, c, peaks, per_sample);
}
__global__ void sample_peak_f16(const __half* u, const __half* c, float* peaks, long long per_sample) {
    sample_peak_impl(u, c, peaks, per_sample);
}

__global__ void energy_f32(const float* u, const float* c, const float* peaks, float* e,
                           long long B, long long O, long long C, long long I) {
    energy_impl(u, c, peaks, e, B, O, C, I);
}
__global__ void energy_f16(const __half* u, const __half* c, const float* peaks, float* e,
                           long long B, long long O, long long C, long long I) {
    energy_impl(u, c, peaks, e, B, O, C, I);
}

// One block per sample; blockDim.x must be a power of two <= 1024.
__global__ void normalizer(const float* energy, const float* peaks, float* normalizers, long long positions,
                           float eps) {
    extern __shared__ float partial[];
    const float* row = energy + blockIdx.x * positions;
    float acc = 0.f;
    for (long long p = threadIdx.x; p < positions; p += blockDim.x) acc += row[p];
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        // (eps / s) / s, never s * s (which underflows for s < 1e-23); +Inf only for s < 5.4e-26,
        // where the spec's normalized energy is ~0 and E / Inf = 0 is that value.
        const float scale = energy_scale(peaks, blockIdx.x);
        normalizers[blockIdx.x] = partial[0] / (float)positions + eps / scale / scale;
    }
}

__global__ void membership(const float* energy, const float* normalizers, float* member,
                           long long B, long long positions, float tau, float sharpness) {
    long long total = B * positions;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        float normalized = energy[idx] / normalizers[idx / positions];
        member[idx] = 1.f / (1.f + expf(-sharpness * (normalized - tau)));
    }
}

// src, dst: planes of H x W. along_rows=1 filters along W (within a row), 0 along H.
__global__ void smooth_pass(const float* src, float* dst, long long planes, long long H, long long W,
                            int along_rows, float edge, float centre) {
    long long total = planes * H * W;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        long long plane = idx / (H * W), r = idx % (H * W);
        long long y = r / W, x = r % W;
        const float* p = src + plane * H * W;
        float v;
        if (along_rows) {
            v = edge * p[y * W + reflect(x - 1, W)] + centre * p[y * W + x] + edge * p[y * W + reflect(x + 1, W)];
        } else {
            v = edge * p[reflect(y - 1, H) * W + x] + centre * p[y * W + x] + edge * p[reflect(y + 1, H) * W + x];
        }
        dst[idx] = v;
    }
}

__global__ void combine_f32(const float* u, const float* c, const float* scales, const float* member,
                            float* out, long long B, long long O, long long C, long long I) {
    combine_impl(u, c, scales, member, out, B, O, C, I);
}
__global__ void combine_f16(const __half* u, const __half* c, const float* scales, const float* member,
                            __half* out, long long B, long long O, long long C, long long I) {
    combine_impl(u, c, scales, member, out, B, O, C, I);
}

}  // extern "C"
"""

KERNEL_NAMES = (
    "sample_peak_f32",
    "sample_peak_f16",
    "energy_f32",
    "energy_f16",
    "normalizer",
    "membership",
    "smooth_pass",
    "combine_f32",
    "combine_f16",
)
