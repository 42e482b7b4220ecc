// Work split over XLA's intra-op thread pool (cnnjax.native's kernels share it).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace cnnjax {

// Runs part(i) for every i in [0, k): parts are taken in turn by the calling thread and by k - 1
// tasks scheduled on XLA's pool, so a busy pool never blocks the caller (it runs whatever the pool
// has not started). part returns an error message, '' for none; the first one is returned after
// every part has finished. Which thread runs a part never changes what it computes.
inline std::string parallel_parts(xla::ffi::ThreadPool& pool, int64_t k,
                                  std::function<std::string(int64_t)> part) {
  if (k <= 1) return k == 1 ? part(0) : "";
  struct State {
    std::atomic<int64_t> next{0};
    int64_t k = 0, finished = 0;
    std::mutex mu;
    std::condition_variable cv;
    std::string error;
    std::function<std::string(int64_t)> part;
  };
  // Shared: a pool task may start after the last part is done and the caller has returned.
  auto state = std::make_shared<State>();
  state->k = k;
  state->part = std::move(part);
  auto take = [](const std::shared_ptr<State>& s) {
    for (int64_t i; (i = s->next.fetch_add(1)) < s->k;) {
      std::string error = s->part(i);
      std::lock_guard<std::mutex> lock(s->mu);
      if (!error.empty() && s->error.empty()) s->error = error;
      if (++s->finished == s->k) s->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < k; ++t) pool.Schedule([state, take] { take(state); });
  take(state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->finished == state->k; });
  return state->error;
}

// Parts per thread of a split call. Parts are claimed one at a time, so with several per thread
// a thread that starts late (busy, or still waking up) takes fewer, and the caller waits less for
// the last one (PERFORMANCE.md section 11: 8 convolution parts per thread made the ResNet-56
// step 1.03-1.09x faster than one per thread on two threads, in five interleaved probes).
constexpr int64_t kPartsPerThread = 8;

// How many parts to split `items` into: up to kPartsPerThread per thread of XLA's pool, none of
// fewer than `min_items` items, but at least `floor` parts (and at most `items`). One thread: one
// part (nothing to even out, and one call is cheaper than several).
inline int64_t part_count(xla::ffi::ThreadPool& pool, int64_t items, int64_t min_items, int64_t floor) {
  if (pool.num_threads() <= 1) return 1;
  int64_t k = std::min<int64_t>(kPartsPerThread * pool.num_threads(), items / std::max<int64_t>(min_items, 1));
  return std::max<int64_t>(1, std::min(items, std::max(k, floor)));
}

// Part i of n items split into k nearly equal parts: [begin, end).
inline void part_range(int64_t n, int64_t k, int64_t i, int64_t& begin, int64_t& end) {
  int64_t base = n / k, extra = n % k;
  begin = i * base + (i < extra ? i : extra);
  end = begin + base + (i < extra ? 1 : 0);
}

}  // namespace cnnjax
