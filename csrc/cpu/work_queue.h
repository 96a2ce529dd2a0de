// Dynamic work distribution for the CPU kernels. at::parallel_for splits a range statically, so a
// thread that loses its core to another process stalls the whole call while the other waits at the
// barrier; here each worker takes the next block of items from a shared counter until none is left.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace drmm {
namespace cpu {

class WorkQueue {
 public:
  WorkQueue(int64_t n, int64_t block) : n_(n), block_(std::max<int64_t>(1, block)) {}

  // Number of workers worth starting (each gets per-worker scratch, indexed 0 .. workers()-1).
  int64_t workers() const {
    return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n_ + block_ - 1) / block_));
  }

  // The next [begin, end) block, or false when the range is exhausted.
  bool take(int64_t* begin, int64_t* end) {
    const int64_t b = next_.fetch_add(block_, std::memory_order_relaxed);
    if (b >= n_) return false;
    *begin = b;
    *end = std::min(n_, b + block_);
    return true;
  }

  // Runs body(worker, queue) on workers() threads; body calls take() until it returns false.
  template <typename F>
  void run(const F& body) {
    at::parallel_for(0, workers(), 1, [&](int64_t wb, int64_t we) {
      for (int64_t w = wb; w < we; ++w) body(w, *this);
    });
  }

 private:
  const int64_t n_, block_;
  std::atomic<int64_t> next_{0};
};

}  // namespace cpu
}  // namespace drmm
