// samg::GuidanceCombine v1 on the CPU: the SAMG combine of docs/guidance-op.md.
//
//   E(p) = sum_c (c - u)^2            energy per location (float32)
//   Ê(p) = E(p) / (mean_p E + 1e-12)  per sample, over every spatial location (whole clip for video)
//   m(p) = sigmoid(k * (Ê(p) - tau))  optionally smoothed 3x3 over the last two axes (reflect pad)
//   w(p) = w_max - (w_max - w_min) * m(p)
//   out  = u + w(p) * (c - u)
//
// Plain C interface so that ctypes, the ORT custom op and the C++ runtime can all call it.
#ifndef SAMG_PLUGINS_CPU_GUIDANCE_COMBINE_H_
#define SAMG_PLUGINS_CPU_GUIDANCE_COMBINE_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum samg_dtype {
  SAMG_DTYPE_FLOAT32 = 0,
  SAMG_DTYPE_FLOAT16 = 1,
  SAMG_DTYPE_BFLOAT16 = 2,
} samg_dtype;

// The tensor [B, d1, ..., dn] seen as [B, outer, C, inner] around the channel axis.
typedef struct samg_combine_layout {
  int64_t batch;
  int64_t outer;     // product of the dims between batch and channel (1 for channel_axis 1)
  int64_t channels;
  int64_t inner;     // product of the dims after the channel axis
  int64_t height;    // last two tensor dims: the plane that smoothing runs over
  int64_t width;
} samg_combine_layout;

typedef struct samg_combine_params {
  float tau;        // 1.0 by default
  float sharpness;  // 4.0 by default
  int smooth;       // 0 (off) or 3 (3x3 smoothing of the membership map)
  int channel_axis; // 1, or 2 for [B, F, C, H, W]
} samg_combine_params;

// Checks the shape and attributes and fills `layout`. Returns NULL when valid, otherwise a static
// message naming the problem. Accepted: 4-D with channel_axis 1, 5-D with channel_axis 1 or 2;
// smooth=3 needs H, W >= 2 (the last two axes).
const char* samg_combine_make_layout(const int64_t* dims, int rank, const samg_combine_params* params,
                                     samg_combine_layout* layout);

// Runs the combine. `scales` is [B, 2] float32 (w_min, w_max). `u`, `c`, `out` share `dtype`.
// `num_threads` <= 0 picks a count from the hardware and the problem size.
// Returns NULL on success or a static error message.
const char* samg_guidance_combine_cpu(const void* u, const void* c, const float* scales, void* out,
                                      samg_dtype dtype, const int64_t* dims, int rank,
                                      const samg_combine_params* params, int num_threads);

#ifdef __cplusplus
}
#endif

#endif  // SAMG_PLUGINS_CPU_GUIDANCE_COMBINE_H_
