// BlockArena: the device memory holding the active BAdam block's optimizer state.
//
// What the state is made of is data, a StateSpec: named regions, each with a dtype and a block
// (1 for one item per element, the quantization block for per-block scales). The arena allocates
// every region of the spec in one byte buffer, sized for the largest block, and lays each block out
// at element offsets shared by all regions. Switching to another block only computes a new layout
// and hands out new views into the same memory. reserve() grows the buffer (a new allocation).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

namespace badam {

// Every region starts on this many bytes, and every parameter inside a per-element region too.
// The one alignment constant of the package (badam_ext._C.ALIGNMENT_BYTES).
constexpr int64_t kAlignmentBytes = 256;

// One region of a state: `block` elements share one item (1: per element).
struct RegionSpec {
  std::string name;
  at::ScalarType dtype;
  int64_t block = 1;
};

// The optimizer state of one element, as data. Validated on construction.
class StateSpec {
 public:
  StateSpec(std::string name, std::vector<RegionSpec> regions);

  // The bit-exact default: fp32 master, exp_avg, exp_avg_sq.
  static StateSpec fp32();

  const std::string& name() const { return name_; }
  const std::vector<RegionSpec>& regions() const { return regions_; }
  std::vector<std::string> region_names() const;
  // Index of a region; raises ValueError naming the spec's regions when absent.
  int64_t index(const std::string& region) const;
  bool has(const std::string& region) const;

  // Parameter offsets are multiples of this many elements: kAlignmentBytes in every per-element
  // region, and whole quantization blocks in every blocked one.
  int64_t element_alignment() const { return element_alignment_; }
  // Items of region r for `numel` elements (ceil(numel / block)).
  int64_t items(int64_t r, int64_t numel) const;
  // Bytes of region r for a capacity of `numel` elements, padded to kAlignmentBytes.
  int64_t region_bytes(int64_t r, int64_t numel) const;
  // Bytes of every region for a capacity of `numel` elements (capacity rounded up to the alignment).
  int64_t bytes(int64_t numel) const;
  std::string repr() const;

 private:
  std::string name_;
  std::vector<RegionSpec> regions_;
  int64_t element_alignment_ = 1;
};

// Per-parameter placement of one block (offsets and numels in elements, the same in every region).
struct ArenaLayout {
  std::vector<int64_t> offsets;
  std::vector<int64_t> numels;
  int64_t total_numel = 0;  // end of the last parameter, rounded up to the alignment
  uint64_t arena_id = 0;    // identity (and generation) of the arena that made this layout

  size_t size() const { return offsets.size(); }
  std::string repr() const;
};

// Padded element total of a block with these parameter sizes under `spec`; an arena with
// capacity_numel >= required_capacity(numels, spec) can hold it. Validates like BlockArena::layout.
int64_t required_capacity(const std::vector<int64_t>& numels, const StateSpec& spec);

class BlockArena {
 public:
  BlockArena(int64_t capacity_numel, c10::Device device, StateSpec spec = StateSpec::fp32());

  // Offsets for a block whose parameters have these numels (in order). The block fits when its
  // last parameter ends within capacity_numel: the alignment padding after it needs no room.
  ArenaLayout layout(const std::vector<int64_t>& numels) const;

  // Per region (spec order), one view per parameter: per-element regions with the given shapes,
  // blocked regions 1-D with ceil(numel / block) items. Counts one switch.
  std::vector<std::vector<at::Tensor>> views(const ArenaLayout& layout,
                                             const std::vector<std::vector<int64_t>>& shapes);

  // 1-D view of a whole region in its dtype: capacity_numel elements (blocked: their items).
  at::Tensor flat(const std::string& name) const;

  // The whole allocation (alignment slack included) as a 1-D uint8 tensor, for inspection.
  at::Tensor buffer() const;

  // Make room for blocks of up to capacity_numel elements: a new, larger allocation when the
  // current one is too small (its contents are not kept; layouts made before are refused, views
  // handed out before keep the old memory alive). The old buffer is freed before the new one is
  // made, so that two never coexist; if that allocation fails the arena is released and refuses
  // further use. Returns whether it allocated.
  bool reserve(int64_t capacity_numel);

  // Check that tensors (the block's weights or grads) fit the layout and live on the arena's device.
  void check_tensors(const ArenaLayout& layout, const std::vector<at::Tensor>& tensors) const;

  // Drop the arena's reference to its buffer. Views handed out earlier keep the storage alive until
  // they die; the arena itself refuses any further use. Calling release() again does nothing.
  void release();

  const StateSpec& spec() const { return spec_; }
  int64_t capacity_numel() const { return capacity_numel_; }
  int64_t capacity_padded() const { return capacity_padded_; }
  int64_t capacity_bytes() const { return capacity_bytes_; }
  int64_t used_bytes() const { return used_bytes_; }
  int64_t allocations() const { return allocations_; }
  int64_t switches() const { return switches_; }
  int64_t num_regions() const { return static_cast<int64_t>(spec_.regions().size()); }
  bool released() const { return released_; }
  c10::Device device() const { return device_; }
  std::string repr() const;

 private:
  void allocate(int64_t capacity_numel);  // the only place that allocates device memory
  void check_alive() const;
  void check_layout(const ArenaLayout& layout, const char* caller) const;
  at::Tensor region(int64_t index, int64_t numel) const;

  StateSpec spec_;
  int64_t capacity_numel_ = 0;
  int64_t capacity_padded_ = 0;
  c10::Device device_;
  at::Tensor buffer_;                   // the current allocation (uint8)
  int64_t base_offset_ = 0;             // bytes skipped so region 0 starts aligned
  std::vector<int64_t> region_offset_;  // byte offset of each region from the aligned base
  int64_t capacity_bytes_ = 0;          // bytes of the current allocation
  int64_t used_bytes_ = 0;
  int64_t allocations_ = 0;
  int64_t switches_ = 0;
  bool released_ = false;
  uint64_t id_ = 0;
};

}  // namespace badam
