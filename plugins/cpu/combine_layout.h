/* Shape and attribute checks of samg::GuidanceCombine, shared by the CPU and CUDA kernels.
 * Header-only C so that every implementation rejects exactly the same inputs with the same words. */
#ifndef SAMG_PLUGINS_CPU_COMBINE_LAYOUT_H_
#define SAMG_PLUGINS_CPU_COMBINE_LAYOUT_H_

#include <stdint.h>

typedef enum samg_dtype {
  SAMG_DTYPE_FLOAT32 = 0,
  SAMG_DTYPE_FLOAT16 = 1,
  SAMG_DTYPE_BFLOAT16 = 2,
} samg_dtype;

/* The tensor [B, d1, ..., dn] seen as [B, outer, C, inner] around the channel axis. */
typedef struct samg_combine_layout {
  int64_t batch;
  int64_t outer;    /* product of the dims between batch and channel (1 for channel_axis 1) */
  int64_t channels;
  int64_t inner;    /* product of the dims after the channel axis */
  int64_t height;   /* last two tensor dims: the plane that smoothing runs over */
  int64_t width;
} samg_combine_layout;

typedef struct samg_combine_params {
  float tau;        /* 1.0 by default */
  float sharpness;  /* 4.0 by default */
  int smooth;       /* 0 (off) or 3 (3x3 smoothing of the membership map) */
  int channel_axis; /* 1, or 2 for [B, F, C, H, W] */
} samg_combine_params;

/* NULL when valid (and `layout` filled), else a static message naming the problem.
 * Accepted: 4-D with channel_axis 1, 5-D with channel_axis 1 or 2; smooth=3 needs H, W >= 2. */
static inline const char* samg_combine_layout_from_dims(const int64_t* dims, int rank,
                                                        const samg_combine_params* params,
                                                        samg_combine_layout* layout) {
  int i;
  if (rank != 4 && rank != 5)
    return "predictions must be 4-D [B, C, H, W] or 5-D video [B, C, F, H, W] / [B, F, C, H, W]";
  if (params->channel_axis != 1 && !(params->channel_axis == 2 && rank == 5))
    return "channel_axis must be 1, or 2 for 5-D [B, F, C, H, W] video";
  if (params->smooth != 0 && params->smooth != 3) return "attribute smooth must be 0 or 3";
  /* x - x is 0 only for finite x (NaN and inf give NaN). */
  if (!(params->tau - params->tau == 0.0f) || !(params->sharpness - params->sharpness == 0.0f))
    return "attributes tau and sharpness must be finite";
  for (i = 0; i < rank; ++i)
    if (dims[i] < 0) return "pred_uncond has an unknown (negative) dimension";
  if (params->smooth == 3 && (dims[rank - 1] < 2 || dims[rank - 2] < 2))
    return "smooth=3 needs H and W of at least 2 (reflect padding): use smooth=0";
  layout->batch = dims[0];
  layout->outer = 1;
  for (i = 1; i < params->channel_axis; ++i) layout->outer *= dims[i];
  layout->channels = dims[params->channel_axis];
  layout->inner = 1;
  for (i = params->channel_axis + 1; i < rank; ++i) layout->inner *= dims[i];
  layout->height = dims[rank - 2];
  layout->width = dims[rank - 1];
  return 0;
}

#endif /* SAMG_PLUGINS_CPU_COMBINE_LAYOUT_H_ */
