// samg::GuidanceCombine v1 on the CPU: the SAMG combine of docs/guidance-op.md.
//
//   s    = max |c - u| over the sample (1 where that is 0)
//   E(p) = sum_c ((c - u) / s)^2      energy per location (float32; scaled so nothing overflows)
//   Ê(p) = E(p) / (mean_p E + 1e-12 / s^2)  per sample, over every spatial location (whole clip for
//                                     video): the spec's E0 / (mean E0 + 1e-12) for E0 = sum_c (c - u)^2
//   m(p) = sigmoid(k * (Ê(p) - tau))  optionally smoothed 3x3 over the last two axes (reflect pad)
//   w(p) = w_max - (w_max - w_min) * m(p)
//   out  = u + w(p) * (c - u)
//
// Plain C interface so that ctypes, the ORT custom op and the C++ runtime can all call it.
#ifndef SAMG_PLUGINS_CPU_GUIDANCE_COMBINE_H_
#define SAMG_PLUGINS_CPU_GUIDANCE_COMBINE_H_

#include <stddef.h>
#include <stdint.h>

#include "combine_layout.h"

#ifdef __cplusplus
extern "C" {
#endif

// samg_combine_layout_from_dims (combine_layout.h), exported for callers that load the library.
const char* samg_combine_make_layout(const int64_t* dims, int rank, const samg_combine_params* params,
                                     samg_combine_layout* layout);

// Runs the combine. `scales` is [B, 2] float32 (w_min, w_max). `u`, `c`, `out` share `dtype`.
// `num_threads` <= 0 picks a count from the hardware and the problem size.
// Returns NULL on success or a static error message.
const char* samg_guidance_combine_cpu(const void* u, const void* c, const float* scales, void* out,
                                      samg_dtype dtype, const int64_t* dims, int rank,
                                      const samg_combine_params* params, int num_threads);

// Runs fn(fn_context, i) for i in [0, count), possibly in parallel, and returns when all are done.
typedef void (*samg_parallel_for_fn)(void* runner_context, void (*fn)(void*, size_t), size_t count, void* fn_context);

// As samg_guidance_combine_cpu, with the caller's thread pool (e.g. ONNX Runtime's) doing the work.
const char* samg_guidance_combine_cpu_ex(const void* u, const void* c, const float* scales, void* out,
                                         samg_dtype dtype, const int64_t* dims, int rank,
                                         const samg_combine_params* params, int num_threads,
                                         samg_parallel_for_fn runner, void* runner_context);

#ifdef __cplusplus
}
#endif

#endif  // SAMG_PLUGINS_CPU_GUIDANCE_COMBINE_H_
