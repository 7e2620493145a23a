// HostBuffer: one host allocation (pinned when an accelerator is present) that holds the
// checkpointed layer inputs offloaded during forward, reused every step.
//
// A bump allocator over one buffer: `acquire(nbytes)` hands out an aligned slice, `reset()` starts
// the next step at offset 0. The buffer is sized once from the memory plan (`reserve`); only a
// request that does not fit makes a new, larger allocation (counted in `allocations`), and slices
// handed out before keep the old buffer alive until they are dropped.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace badam {

class HostBuffer {
 public:
  // capacity_bytes may be 0 (allocate on the first reserve/acquire). pinned: page-locked memory
  // (needs an accelerator); alignment_bytes: a power of two, the start of every slice.
  HostBuffer(int64_t capacity_bytes, bool pinned, int64_t alignment_bytes = 256);

  // Make room for at least `capacity_bytes` in one buffer; a no-op when it already fits. Only
  // allowed while no slice of the current step is out (used_bytes() == 0).
  void reserve(int64_t capacity_bytes);
  // A uint8 tensor of `nbytes` aliasing the buffer, starting at an aligned offset.
  at::Tensor acquire(int64_t nbytes);
  // Start handing out slices from offset 0 again (the caller guarantees none is still in use).
  void reset();
  // Free the buffer; later use raises.
  void release();

  int64_t capacity_bytes() const { return capacity_; }
  int64_t used_bytes() const { return used_; }
  int64_t peak_bytes() const { return peak_; }
  int64_t allocations() const { return allocations_; }
  int64_t alignment_bytes() const { return alignment_; }
  bool pinned() const { return pinned_; }
  bool released() const { return released_; }
  std::string repr() const;

 private:
  void allocate(int64_t capacity_bytes);
  void check_live(const char* what) const;

  at::Tensor buffer_;
  int64_t capacity_ = 0;
  int64_t shift_ = 0;  // bytes from the buffer's start to the first aligned byte
  int64_t used_ = 0;
  int64_t peak_ = 0;
  int64_t allocations_ = 0;
  int64_t alignment_;
  bool pinned_;
  bool released_ = false;
};

}  // namespace badam
