// Minimal fork-join parallelism for the CPU backend: dynamic scheduling of independent tasks.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace fusedmoe::detail::cpu {

inline int num_threads() {
  static const int n = [] {
    if (const char* env = std::getenv("FUSEDMOE_NUM_THREADS")) {
      const int v = std::atoi(env);
      if (v > 0) return v;
    }
    return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return n;
}

// Runs fn(task, worker) for task in [0, n_tasks); `worker` in [0, workers) indexes per-thread scratch.
// Returns the number of workers used. Exceptions from tasks are rethrown on the calling thread.
template <class Fn>
int parallel_for(int64_t n_tasks, Fn&& fn, int64_t min_tasks_per_thread = 1) {
  if (n_tasks <= 0) return 0;
  const int workers =
      static_cast<int>(std::min<int64_t>(num_threads(), std::max<int64_t>(1, n_tasks / std::max<int64_t>(1, min_tasks_per_thread))));
  if (workers == 1) {
    for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
    return 1;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto run = [&](int worker) {
    try {
      for (int64_t t; (t = next.fetch_add(1)) < n_tasks;) fn(t, worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next.store(n_tasks);
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  for (int w = 1; w < workers; ++w) threads.emplace_back(run, w);
  run(0);
  for (auto& th : threads) th.join();
  if (error) std::rethrow_exception(error);
  return workers;
}

// parallel_for over rows in chunks of about 2^15 elements' work, for elementwise work: fn(begin, end) per chunk
// (so a chunk can set up its row buffers once).
template <class Fn>
void parallel_row_chunks(int64_t rows, int64_t row_cost, Fn&& fn) {
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, row_cost));
  const int64_t n_chunks = (rows + chunk - 1) / chunk;
  parallel_for(n_chunks, [&](int64_t c, int) { fn(c * chunk, std::min(rows, (c + 1) * chunk)); });
}

}  // namespace fusedmoe::detail::cpu
