// CPU implementation of samg::GuidanceCombine v1 (see guidance_combine.h for the math).
//
// Three passes over the inputs: (0) the per-sample max |c - u|; (1) energy per location of the
// difference divided by that max, and its per-sample sum; (2) scale map and combine. Between them,
// map-sized work only (the map is 1/C of the data). Work is split into
// tasks of (sample, outer index, run of inner positions) so that every loop walks contiguous memory
// with no cross-task writes, and the inner loops are plain float loops the compiler vectorizes.
#include "guidance_combine.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <thread>
#include <vector>

#include "half.h"

namespace samg {
namespace {

constexpr double kEpsilon = 1e-12;
// 1-D smoothing weights [e^-1, 1, e^-1] / (1 + 2 e^-1), as S-CFG uses.
constexpr float kSideWeight = 0.21194155761708547f;
constexpr float kCenterWeight = 0.5761168847658291f;
// Positions per task: large enough to amortize scheduling, small enough to balance 2-16 threads.
constexpr int64_t kTargetPositionsPerTask = 4096;

struct Float32 {
  using Storage = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
struct Float16 {
  using Storage = uint16_t;
  static float load(uint16_t v) { return half_to_float(v); }
  static uint16_t store(float v) { return float_to_half(v); }
};
struct BFloat16 {
  using Storage = uint16_t;
  static float load(uint16_t v) { return bfloat16_to_float(v); }
  static uint16_t store(float v) { return float_to_bfloat16(v); }
};

struct Task {
  int64_t batch_index;
  int64_t outer_index;
  int64_t inner_begin;
  int64_t inner_end;
};

// Runs fn(task_index) for every task: on the caller's runner (e.g. ONNX Runtime's intra-op pool,
// whose threads would otherwise spin against ours) or on up to `num_threads` std::threads.
struct Parallel {
  int num_threads = 1;
  samg_parallel_for_fn runner = nullptr;
  void* runner_context = nullptr;

  template <typename Fn>
  void run(int64_t num_tasks, const Fn& fn) const {
    if (num_tasks <= 0) return;
    if (runner != nullptr && num_tasks > 1) {
      auto trampoline = [](void* data, size_t index) { (*static_cast<const Fn*>(data))(static_cast<int64_t>(index)); };
      runner(runner_context, trampoline, static_cast<size_t>(num_tasks), const_cast<Fn*>(&fn));
      return;
    }
    const int workers = static_cast<int>(std::min<int64_t>(num_threads, num_tasks));
    if (workers <= 1) {
      for (int64_t t = 0; t < num_tasks; ++t) fn(t);
      return;
    }
    std::atomic<int64_t> next{0};
    auto drain = [&]() {
      for (int64_t t = next.fetch_add(1); t < num_tasks; t = next.fetch_add(1)) fn(t);
    };
    std::vector<std::thread> threads;
    threads.reserve(workers - 1);
    for (int i = 0; i < workers - 1; ++i) threads.emplace_back(drain);
    drain();
    for (auto& thread : threads) thread.join();
  }
};

int pick_thread_count(int requested, int64_t total_elements) {
  if (requested > 0) return requested;
  if (const char* env = std::getenv("SAMG_NUM_THREADS")) {
    const int from_env = std::atoi(env);
    if (from_env > 0) return from_env;
  }
  const int hardware = std::max(1u, std::thread::hardware_concurrency());
  // Starting a thread costs tens of microseconds: below ~64k elements one thread is faster.
  const int64_t useful = std::max<int64_t>(1, total_elements / 65536);
  return static_cast<int>(std::min<int64_t>(hardware, useful));
}

std::vector<Task> make_tasks(const samg_combine_layout& layout, bool whole_rows) {
  int64_t chunk = std::max<int64_t>(1, kTargetPositionsPerTask / std::max<int64_t>(1, layout.channels / 4));
  if (whole_rows) chunk = std::max<int64_t>(1, chunk / layout.width) * layout.width;
  std::vector<Task> tasks;
  for (int64_t b = 0; b < layout.batch; ++b)
    for (int64_t o = 0; o < layout.outer; ++o)
      for (int64_t i = 0; i < layout.inner; i += chunk)
        tasks.push_back({b, o, i, std::min(layout.inner, i + chunk)});
  return tasks;
}

inline int64_t reflect(int64_t i, int64_t n) {
  if (n == 1) return 0;
  if (i < 0) return -i;
  if (i >= n) return 2 * n - 2 - i;
  return i;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

template <typename Type>
void combine(const typename Type::Storage* u, const typename Type::Storage* c, const float* scales,
             typename Type::Storage* out, const samg_combine_layout& L, const samg_combine_params& P,
             const Parallel& parallel) {
  const int64_t positions = L.outer * L.inner;  // per sample
  const bool smoothing = P.smooth == 3;
  const std::vector<Task> tasks = make_tasks(L, smoothing);
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  std::vector<float> energy(static_cast<size_t>(L.batch * positions));
  std::vector<double> partial_sums(tasks.size());
  std::vector<float> partial_peaks(tasks.size());

  auto data_offset = [&](const Task& t, int64_t channel) {
    return ((t.batch_index * L.outer + t.outer_index) * L.channels + channel) * L.inner;
  };
  auto map_offset = [&](const Task& t) { return t.batch_index * positions + t.outer_index * L.inner; };

  // Pass 0: this task's max |c - u| (a NaN is skipped here; it makes the sample's energy NaN below).
  parallel.run(num_tasks, [&](int64_t task_index) {
    const Task& t = tasks[task_index];
    float peak = 0.0f;
    for (int64_t ch = 0; ch < L.channels; ++ch) {
      const auto* uc = u + data_offset(t, ch);
      const auto* cc = c + data_offset(t, ch);
      for (int64_t i = t.inner_begin; i < t.inner_end; ++i)
        peak = std::max(peak, std::fabs(Type::load(cc[i]) - Type::load(uc[i])));
    }
    partial_peaks[task_index] = peak;
  });
  // Per sample: the energy is taken on (c - u) / max|c - u| so that its squares and sums stay in
  // float32 range (eps is scaled alike below, so the normalized energy is the spec's); 1 where the
  // max is 0 (c == u).
  std::vector<float> energy_scale(static_cast<size_t>(L.batch), 0.0f);
  for (int64_t t = 0; t < num_tasks; ++t)
    energy_scale[tasks[t].batch_index] = std::max(energy_scale[tasks[t].batch_index], partial_peaks[t]);
  for (float& scale : energy_scale)
    if (!(scale > 0.0f)) scale = 1.0f;

  // Pass 1: E(p) = sum_c ((c - u) / scale)^2 in float32, and this task's share of the sample's sum.
  parallel.run(num_tasks, [&](int64_t task_index) {
    const Task& t = tasks[task_index];
    float* e = energy.data() + map_offset(t);
    const float scale = energy_scale[t.batch_index];
    const int64_t begin = t.inner_begin, end = t.inner_end;
    for (int64_t i = begin; i < end; ++i) e[i] = 0.0f;
    for (int64_t ch = 0; ch < L.channels; ++ch) {
      const auto* uc = u + data_offset(t, ch);
      const auto* cc = c + data_offset(t, ch);
      for (int64_t i = begin; i < end; ++i) {
        const float d = (Type::load(cc[i]) - Type::load(uc[i])) / scale;
        e[i] += d * d;
      }
    }
    double sum = 0.0;
    for (int64_t i = begin; i < end; ++i) sum += e[i];
    partial_sums[task_index] = sum;
  });

  // Per sample: 1 / (mean E + (eps / scale) / scale), the spec's 1 / (mean E0 + eps) for the energy
  // E0 = scale^2 E of c - u itself (in double: nothing overflows or underflows that matters).
  std::vector<float> inverse_mean(static_cast<size_t>(L.batch), 0.0f);
  {
    std::vector<double> sums(static_cast<size_t>(L.batch), 0.0);
    for (int64_t t = 0; t < num_tasks; ++t) sums[tasks[t].batch_index] += partial_sums[t];
    for (int64_t b = 0; b < L.batch; ++b) {
      const double scale = energy_scale[b];
      const double scaled_epsilon = kEpsilon / scale / scale;
      inverse_mean[b] = static_cast<float>(1.0 / (sums[b] / static_cast<double>(positions) + scaled_epsilon));
    }
  }
  const float tau = P.tau, k = P.sharpness;

  // Membership in place of the energy; with smoothing it must be complete before pass 2 reads
  // neighbours, so it is its own (map-sized) sweep.
  auto membership = [&](const Task& t, float* m) {
    const float inv = inverse_mean[t.batch_index];
    for (int64_t i = t.inner_begin; i < t.inner_end; ++i) m[i] = sigmoid(k * (m[i] * inv - tau));
  };
  if (smoothing) {
    parallel.run(num_tasks, [&](int64_t task_index) {
      const Task& t = tasks[task_index];
      membership(t, energy.data() + map_offset(t));
    });
  }

  // Pass 2: scale map for this task's positions, then out = u + w * (c - u) channel by channel.
  parallel.run(num_tasks, [&](int64_t task_index) {
    const Task& t = tasks[task_index];
    const float w_min = scales[2 * t.batch_index], w_max = scales[2 * t.batch_index + 1];
    const float span = w_max - w_min;
    const int64_t count = t.inner_end - t.inner_begin;
    thread_local std::vector<float> weight, column;
    weight.resize(static_cast<size_t>(count));
    float* m_base = energy.data() + map_offset(t);
    if (!smoothing) {
      membership(t, m_base);
      const float* m = m_base + t.inner_begin;
      for (int64_t i = 0; i < count; ++i) weight[i] = w_max - span * m[i];
    } else {
      // Whole rows of a (height x width) plane: vertical pass into `column`, then horizontal.
      const int64_t W = L.width, H = L.height;
      column.resize(static_cast<size_t>(W));
      for (int64_t row_start = t.inner_begin; row_start < t.inner_end; row_start += W) {
        const int64_t plane_start = row_start - (row_start % (H * W));
        const int64_t y = (row_start - plane_start) / W;
        const float* above = m_base + plane_start + reflect(y - 1, H) * W;
        const float* here = m_base + row_start;
        const float* below = m_base + plane_start + reflect(y + 1, H) * W;
        for (int64_t x = 0; x < W; ++x)
          column[x] = kSideWeight * (above[x] + below[x]) + kCenterWeight * here[x];
        float* wrow = weight.data() + (row_start - t.inner_begin);
        for (int64_t x = 0; x < W; ++x) {
          const float left = column[reflect(x - 1, W)], right = column[reflect(x + 1, W)];
          const float smoothed = kSideWeight * (left + right) + kCenterWeight * column[x];
          wrow[x] = w_max - span * smoothed;
        }
      }
    }
    for (int64_t ch = 0; ch < L.channels; ++ch) {
      const int64_t offset = data_offset(t, ch) + t.inner_begin;
      const auto* uc = u + offset;
      const auto* cc = c + offset;
      auto* oc = out + offset;
      for (int64_t i = 0; i < count; ++i) {
        const float uv = Type::load(uc[i]);
        oc[i] = Type::store(uv + weight[i] * (Type::load(cc[i]) - uv));
      }
    }
  });
}

}  // namespace
}  // namespace samg

extern "C" const char* samg_combine_make_layout(const int64_t* dims, int rank, const samg_combine_params* params,
                                                samg_combine_layout* layout) {
  return samg_combine_layout_from_dims(dims, rank, params, layout);
}

extern "C" const char* samg_guidance_combine_cpu_ex(const void* u, const void* c, const float* scales, void* out,
                                                    samg_dtype dtype, const int64_t* dims, int rank,
                                                    const samg_combine_params* params, int num_threads,
                                                    samg_parallel_for_fn runner, void* runner_context) {
  samg_combine_layout layout;
  if (const char* error = samg_combine_make_layout(dims, rank, params, &layout)) return error;
  const int64_t total = layout.batch * layout.outer * layout.channels * layout.inner;
  if (total == 0) return nullptr;
  samg::Parallel parallel;
  parallel.num_threads = samg::pick_thread_count(num_threads, total);
  parallel.runner = runner;
  parallel.runner_context = runner_context;
  switch (dtype) {
    case SAMG_DTYPE_FLOAT32:
      samg::combine<samg::Float32>(static_cast<const float*>(u), static_cast<const float*>(c), scales,
                                   static_cast<float*>(out), layout, *params, parallel);
      return nullptr;
    case SAMG_DTYPE_FLOAT16:
      samg::combine<samg::Float16>(static_cast<const uint16_t*>(u), static_cast<const uint16_t*>(c), scales,
                                   static_cast<uint16_t*>(out), layout, *params, parallel);
      return nullptr;
    case SAMG_DTYPE_BFLOAT16:
      samg::combine<samg::BFloat16>(static_cast<const uint16_t*>(u), static_cast<const uint16_t*>(c), scales,
                                    static_cast<uint16_t*>(out), layout, *params, parallel);
      return nullptr;
  }
  return "unsupported dtype (float32, float16 or bfloat16)";
}

extern "C" const char* samg_guidance_combine_cpu(const void* u, const void* c, const float* scales, void* out,
                                                 samg_dtype dtype, const int64_t* dims, int rank,
                                                 const samg_combine_params* params, int num_threads) {
  return samg_guidance_combine_cpu_ex(u, c, scales, out, dtype, dims, rank, params, num_threads, nullptr, nullptr);
}
