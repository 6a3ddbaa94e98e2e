/* samg::GuidanceCombine v1 on an NVIDIA GPU: the same math as plugins/cpu/guidance_combine.h.
 *
 * C launch API for the TensorRT plugin, an ORT CUDA op, or Python via ctypes. Every pointer is a
 * device pointer (scales too: [B, 2] float32 on the device); `stream` is a cudaStream_t (NULL for
 * the default stream). The call only enqueues work: it does not synchronize.
 *
 * Three passes over the predictions: (0) per-sample max |c - u| (one atomic max per block);
 * (1) energy per location of (c - u) / that max + per-sample sum (one double atomic per block);
 * (2) scale map and combine. With smooth=3 a map-sized kernel between them writes the
 * membership map that pass 2 reads with its 3x3 neighbourhood.
 */
#ifndef SAMG_PLUGINS_CUDA_GUIDANCE_COMBINE_H_
#define SAMG_PLUGINS_CUDA_GUIDANCE_COMBINE_H_

#include <stddef.h>
#include <stdint.h>

#include "../cpu/combine_layout.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bytes of device workspace samg_guidance_combine_cuda needs for this shape (0 if invalid). */
size_t samg_guidance_combine_cuda_workspace_size(const int64_t* dims, int rank, const samg_combine_params* params);

/* Enqueues the combine. Returns NULL on success, else a static message (bad shape/attributes,
 * workspace too small, or the CUDA launch error string). */
const char* samg_guidance_combine_cuda(const void* u, const void* c, const float* scales, void* out,
                                       samg_dtype dtype, const int64_t* dims, int rank,
                                       const samg_combine_params* params, void* workspace,
                                       size_t workspace_bytes, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* SAMG_PLUGINS_CUDA_GUIDANCE_COMBINE_H_ */
