// BlockArena: one device allocation holding the active BAdam block's fp32 optimizer state.
//
// The arena is allocated once, sized for the largest block. It holds `num_regions` regions of
// `capacity_padded` floats each, back to back: master weights, exp_avg, exp_avg_sq and, with
// `with_grad`, an fp32 gradient region. Switching to another block only computes a new layout and
// hands out new views into the same memory: no allocation, no free.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace badam {

// Per-parameter placement of one block inside the arena's regions (offsets and numels in elements).
struct ArenaLayout {
  std::vector<int64_t> offsets;
  std::vector<int64_t> numels;
  int64_t total_numel = 0;  // end of the last parameter, rounded up to the alignment
  uint64_t arena_id = 0;    // identity of the arena that made this layout

  size_t size() const { return offsets.size(); }
  std::string repr() const;
};

// Padded element total of a block with these parameter sizes; an arena with
// capacity_numel >= required_capacity(numels) can hold it (one whose capacity reaches the end of the
// last parameter already does). Validates like BlockArena::layout.
int64_t required_capacity(const std::vector<int64_t>& numels, int64_t alignment_bytes = 256);

class BlockArena {
 public:
  static constexpr int64_t kMaster = 0;
  static constexpr int64_t kExpAvg = 1;
  static constexpr int64_t kExpAvgSq = 2;
  static constexpr int64_t kGrad = 3;

  BlockArena(int64_t capacity_numel, c10::Device device, bool with_grad = false,
             int64_t alignment_bytes = 256);

  // Offsets for a block whose parameters have these numels (in order). The block fits when its
  // last parameter ends within capacity_numel: the alignment padding after it needs no room.
  ArenaLayout layout(const std::vector<int64_t>& numels) const;

  // (master, exp_avg, exp_avg_sq[, grad]) views for the block, with the given shapes.
  // Counts one switch.
  std::vector<std::vector<at::Tensor>> views(const ArenaLayout& layout,
                                             const std::vector<std::vector<int64_t>>& shapes);

  // 1-D fp32 view of a whole region ("master", "exp_avg", "exp_avg_sq", "grad").
  at::Tensor flat(const std::string& name) const;

  // The whole allocation (alignment padding included) as a 1-D fp32 tensor, for inspection.
  at::Tensor buffer() const;

  // Zero exp_avg and exp_avg_sq over [0, layout.total_numel).
  void zero_state(const ArenaLayout& layout);

  // Check that tensors (the block's weights or grads) fit the layout and live on the arena's device.
  void check_tensors(const ArenaLayout& layout, const std::vector<at::Tensor>& tensors) const;

  // Drop the arena's reference to its buffer. Views handed out earlier keep the storage alive until
  // they die; the arena itself refuses any further use. Calling release() again does nothing.
  void release();

  int64_t capacity_numel() const { return capacity_numel_; }
  int64_t capacity_padded() const { return capacity_padded_; }
  int64_t capacity_bytes() const { return capacity_bytes_; }
  int64_t used_bytes() const { return used_bytes_; }
  int64_t allocations() const { return allocations_; }
  int64_t switches() const { return switches_; }
  int64_t alignment_bytes() const { return alignment_bytes_; }
  int64_t num_regions() const { return num_regions_; }
  bool with_grad() const { return with_grad_; }
  bool released() const { return released_; }
  c10::Device device() const { return device_; }
  std::string repr() const;

  static const std::vector<std::string>& region_names();

 private:
  void check_alive() const;
  void check_layout(const ArenaLayout& layout, const char* caller) const;
  at::Tensor region(int64_t index, int64_t length) const;

  int64_t capacity_numel_;
  int64_t capacity_padded_;
  int64_t alignment_bytes_;
  int64_t num_regions_;
  bool with_grad_;
  c10::Device device_;
  at::Tensor buffer_;           // the one allocation
  int64_t base_offset_ = 0;     // elements skipped so region 0 starts aligned
  int64_t capacity_bytes_ = 0;  // bytes of the one allocation
  int64_t used_bytes_ = 0;
  int64_t allocations_ = 0;
  int64_t switches_ = 0;
  bool released_ = false;
  uint64_t id_;
};

}  // namespace badam
