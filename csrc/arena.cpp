#include "arena.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace badam {
namespace {

constexpr const char* kReleasedMessage = "BlockArena used after release()";

std::atomic<uint64_t> g_next_arena_id{1};

// 1234560 -> "1,234,560" (error messages quote sizes people read).
std::string with_commas(int64_t value) {
  std::string digits = std::to_string(value < 0 ? -value : value);
  std::string out;
  const int64_t n = static_cast<int64_t>(digits.size());
  for (int64_t i = 0; i < n; ++i) {
    if (i > 0 && (n - i) % 3 == 0) out.push_back(',');
    out.push_back(digits[i]);
  }
  return value < 0 ? "-" + out : out;
}

std::string list_repr(const std::vector<int64_t>& values, size_t max_items = 8) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i == max_items) {
      os << ", ... (" << values.size() - max_items << " more)";
      break;
    }
    if (i > 0) os << ", ";
    os << values[i];
  }
  os << "]";
  return os.str();
}

// torch's spelling of a dtype ("float64"), for messages.
std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return "float64";
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(dtype);
  }
}

int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t out = 0;
  TORCH_CHECK_VALUE(!__builtin_add_overflow(a, b, &out), what, " overflows int64");
  return out;
}

int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t out = 0;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(a, b, &out), what, " overflows int64");
  return out;
}

// Smallest multiple of `multiple` that is >= n (n >= 0, multiple > 0).
int64_t round_up(int64_t n, int64_t multiple, const char* what) {
  return checked_add(n, (multiple - n % multiple) % multiple, what);
}

int64_t itemsize(at::ScalarType dtype) { return static_cast<int64_t>(c10::elementSize(dtype)); }

bool power_of_two(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

// Aligned offsets of consecutive parameters; returns the padded total. `data_end`, when given,
// receives the end of the last parameter without the padding after it.
int64_t place(const std::vector<int64_t>& numels, int64_t align_elems, std::vector<int64_t>* offsets,
              int64_t* data_end = nullptr) {
  TORCH_CHECK_VALUE(!numels.empty(), "empty block: a block needs at least one parameter");
  int64_t end = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK_VALUE(numels[i] > 0, "parameter ", i, " has numel ", numels[i],
                      "; every parameter of a block needs numel >= 1");
    if (offsets != nullptr) offsets->push_back(end);
    const int64_t unpadded = checked_add(end, numels[i], "block size");
    if (data_end != nullptr) *data_end = unpadded;
    end = round_up(unpadded, align_elems, "block size");
  }
  return end;
}

// End of a layout's last parameter: the elements of each region the layout actually uses. The
// padding after it may lie past capacity_numel (it is never read or written by the kernels).
int64_t data_end(const ArenaLayout& layout) {
  return layout.size() == 0 ? 0 : layout.offsets.back() + layout.numels.back();
}

}  // namespace

// ------------------------------------------------------------------------------------ StateSpec
StateSpec::StateSpec(std::string name, std::vector<RegionSpec> regions)
    : name_(std::move(name)), regions_(std::move(regions)) {
  TORCH_CHECK_VALUE(!name_.empty(), "StateSpec: the name must not be empty");
  TORCH_CHECK_VALUE(!regions_.empty(), "StateSpec '", name_, "': a state needs at least one region");
  for (size_t r = 0; r < regions_.size(); ++r) {
    const RegionSpec& region = regions_[r];
    TORCH_CHECK_VALUE(!region.name.empty(), "StateSpec '", name_, "': region ", r, " has no name");
    for (size_t s = 0; s < r; ++s) {
      TORCH_CHECK_VALUE(regions_[s].name != region.name, "StateSpec '", name_, "': region '",
                        region.name, "' appears twice");
    }
    const auto dtype = region.dtype;
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                         dtype == at::kByte || dtype == at::kChar,
                     "StateSpec '", name_, "': region '", region.name, "' has dtype ",
                     dtype_name(dtype), "; supported: float32, float16, bfloat16, uint8, int8");
    TORCH_CHECK_VALUE(power_of_two(region.block), "StateSpec '", name_, "': region '",
                      region.name, "' has block ", region.block,
                      "; expected 1 (per element) or a power of two (elements per item)");
    const int64_t need = region.block == 1 ? kAlignmentBytes / itemsize(dtype) : region.block;
    element_alignment_ = std::max(element_alignment_, need);  // powers of two: the max is the lcm
  }
}

StateSpec StateSpec::fp32() {
  return StateSpec("fp32", {{"master", at::kFloat, 1},
                            {"exp_avg", at::kFloat, 1},
                            {"exp_avg_sq", at::kFloat, 1}});
}

std::vector<std::string> StateSpec::region_names() const {
  std::vector<std::string> names;
  for (const auto& region : regions_) names.push_back(region.name);
  return names;
}

bool StateSpec::has(const std::string& region) const {
  for (const auto& r : regions_)
    if (r.name == region) return true;
  return false;
}

int64_t StateSpec::index(const std::string& region) const {
  for (size_t r = 0; r < regions_.size(); ++r)
    if (regions_[r].name == region) return static_cast<int64_t>(r);
  std::string names;
  for (const auto& r : regions_) names += (names.empty() ? "" : ", ") + r.name;
  TORCH_CHECK_VALUE(false, "unknown region '", region, "'; the '", name_, "' state has ", names);
  return -1;
}

int64_t StateSpec::items(int64_t r, int64_t numel) const {
  TORCH_CHECK_VALUE(numel >= 0, "StateSpec.items: numel must be >= 0, got ", numel);
  const int64_t block = regions_.at(r).block;
  return numel / block + (numel % block != 0);
}

int64_t StateSpec::region_bytes(int64_t r, int64_t numel) const {
  const int64_t raw = checked_mul(items(r, numel), itemsize(regions_.at(r).dtype), "region size");
  return round_up(raw, kAlignmentBytes, "region size");
}

int64_t StateSpec::bytes(int64_t numel) const {
  TORCH_CHECK_VALUE(numel >= 0, "StateSpec.bytes: numel must be >= 0, got ", numel);
  const int64_t padded = round_up(numel, element_alignment_, "capacity");
  int64_t total = 0;
  for (size_t r = 0; r < regions_.size(); ++r)
    total = checked_add(total, region_bytes(static_cast<int64_t>(r), padded), "state size");
  return total;
}

std::string StateSpec::repr() const {
  std::ostringstream os;
  os << "StateSpec('" << name_ << "', [";
  for (size_t r = 0; r < regions_.size(); ++r) {
    os << (r ? ", " : "") << regions_[r].name << ": " << dtype_name(regions_[r].dtype);
    if (regions_[r].block != 1) os << " per " << regions_[r].block;
  }
  os << "])";
  return os.str();
}

// ---------------------------------------------------------------------------------- ArenaLayout
std::string ArenaLayout::repr() const {
  std::ostringstream os;
  os << "ArenaLayout(params=" << size() << ", total_numel=" << total_numel
     << ", offsets=" << list_repr(offsets) << ", numels=" << list_repr(numels) << ")";
  return os.str();
}

int64_t required_capacity(const std::vector<int64_t>& numels, const StateSpec& spec) {
  return place(numels, spec.element_alignment(), nullptr);
}

// ----------------------------------------------------------------------------------- BlockArena
BlockArena::BlockArena(int64_t capacity_numel, c10::Device device, StateSpec spec)
    : spec_(std::move(spec)), device_(device) {
  TORCH_CHECK_VALUE(capacity_numel > 0, "capacity_numel must be > 0, got ", capacity_numel);
  TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(),
                    "BlockArena supports cpu and cuda devices, got ", device.str());
  TORCH_CHECK(!device.is_cuda() || at::hasCUDA(), "BlockArena on ", device.str(),
              ": this torch build has no usable CUDA device");
  allocate(capacity_numel);
  device_ = buffer_.device();  // "cuda" -> "cuda:<current>"
}

void BlockArena::allocate(int64_t capacity_numel) {
  const int64_t padded = round_up(capacity_numel, spec_.element_alignment(), "capacity_numel");
  std::vector<int64_t> offsets;
  int64_t total = 0;
  for (int64_t r = 0; r < num_regions(); ++r) {
    offsets.push_back(total);
    total = checked_add(total, spec_.region_bytes(r, padded), "arena size in bytes");
  }
  // The allocator only promises its own alignment (64 bytes on CPU): allocate the slack and start
  // region 0 at the first aligned address inside the buffer.
  const int64_t bytes = checked_add(total, kAlignmentBytes - 1, "arena size in bytes");
  buffer_ = at::Tensor();  // the old buffer goes first: never two at once (views may still hold it)
  try {
    buffer_ = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device_));
  } catch (...) {
    released_ = true;  // no buffer any more: refuse further use instead of failing later
    throw;
  }
  allocations_ += 1;
  const auto address = reinterpret_cast<uintptr_t>(buffer_.data_ptr());
  const auto alignment = static_cast<uintptr_t>(kAlignmentBytes);
  const uintptr_t misalignment = address % alignment;
  base_offset_ = misalignment == 0 ? 0 : static_cast<int64_t>(alignment - misalignment);
  region_offset_ = std::move(offsets);
  capacity_numel_ = capacity_numel;
  capacity_padded_ = padded;
  capacity_bytes_ = bytes;
  used_bytes_ = 0;
  id_ = g_next_arena_id.fetch_add(1);  // layouts of the old allocation are refused from now on
}

bool BlockArena::reserve(int64_t capacity_numel) {
  check_alive();
  TORCH_CHECK_VALUE(capacity_numel > 0, "reserve: capacity_numel must be > 0, got ", capacity_numel);
  if (capacity_numel <= capacity_numel_) return false;
  allocate(capacity_numel);
  return true;
}

void BlockArena::check_alive() const { TORCH_CHECK(!released_, kReleasedMessage); }

void BlockArena::check_layout(const ArenaLayout& layout, const char* caller) const {
  TORCH_CHECK_VALUE(data_end(layout) <= capacity_numel_, caller, ": the layout spans ",
                    with_commas(layout.total_numel), " elements but this arena holds ",
                    with_commas(capacity_numel_), " (its last parameter ends at element ",
                    with_commas(data_end(layout)), ")");
  TORCH_CHECK_VALUE(layout.arena_id == id_, caller,
                    ": the layout was made by another BlockArena, or by this one before it grew; "
                    "make it with this arena's layout()");
  TORCH_INTERNAL_ASSERT(layout.offsets.size() == layout.numels.size());
}

at::Tensor BlockArena::region(int64_t index, int64_t numel) const {
  const auto& spec = spec_.regions()[index];
  const int64_t items = spec_.items(index, numel);
  const int64_t size = itemsize(spec.dtype);
  return buffer_.narrow(0, base_offset_ + region_offset_[index], items * size).view(spec.dtype);
}

ArenaLayout BlockArena::layout(const std::vector<int64_t>& numels) const {
  check_alive();
  ArenaLayout out;
  int64_t end = 0;
  out.total_numel = place(numels, spec_.element_alignment(), &out.offsets, &end);
  // A block fits when its parameters do: the padding after the last one needs no room.
  const int64_t over = end - capacity_numel_;
  TORCH_CHECK_VALUE(over <= 0, "block needs ", with_commas(out.total_numel), " elements (padded)",
                    end == out.total_numel
                        ? std::string()
                        : ", " + with_commas(end) + " up to the end of its last parameter,",
                    " but the arena holds ", with_commas(capacity_numel_), ": ",
                    with_commas(over), " over; create the arena with capacity_numel >= ", end);
  out.numels = numels;
  out.arena_id = id_;
  return out;
}

std::vector<std::vector<at::Tensor>> BlockArena::views(
    const ArenaLayout& layout, const std::vector<std::vector<int64_t>>& shapes) {
  check_alive();
  check_layout(layout, "views");
  TORCH_CHECK_VALUE(shapes.size() == layout.size(), "views: got ", shapes.size(),
                    " shapes for a layout of ", layout.size(), " parameters");
  // Validate every shape before handing out anything, so a failed call changes nothing.
  for (size_t i = 0; i < shapes.size(); ++i) {
    int64_t numel = 1;
    for (int64_t dim : shapes[i]) {
      TORCH_CHECK_VALUE(dim >= 0, "views: shape ", list_repr(shapes[i]), " of parameter ", i,
                        " has a negative size");
      numel = checked_mul(numel, dim, "views: shape size");
    }
    TORCH_CHECK_VALUE(numel == layout.numels[i], "views: shape ", list_repr(shapes[i]),
                      " of parameter ", i, " has ", numel, " elements but the layout gives it ",
                      layout.numels[i]);
  }
  std::vector<std::vector<at::Tensor>> out(num_regions());
  for (int64_t r = 0; r < num_regions(); ++r) {
    const at::Tensor whole = region(r, capacity_numel_);
    const int64_t block = spec_.regions()[r].block;
    out[r].reserve(shapes.size());
    for (size_t i = 0; i < shapes.size(); ++i) {
      if (block == 1) {
        out[r].push_back(whole.narrow(0, layout.offsets[i], layout.numels[i]).view(shapes[i]));
      } else {  // offsets are whole blocks, so each parameter owns its items
        out[r].push_back(
            whole.narrow(0, layout.offsets[i] / block, spec_.items(r, layout.numels[i])));
      }
    }
  }
  switches_ += 1;
  used_bytes_ = spec_.bytes(layout.total_numel);
  return out;
}

at::Tensor BlockArena::flat(const std::string& name) const {
  check_alive();
  int64_t r = -1;
  try {
    r = spec_.index(name);
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, "flat: ", e.what_without_backtrace());
  }
  return region(r, capacity_numel_);
}

at::Tensor BlockArena::buffer() const {
  check_alive();
  return buffer_.alias();
}

void BlockArena::check_tensors(const ArenaLayout& layout,
                               const std::vector<at::Tensor>& tensors) const {
  check_alive();
  check_layout(layout, "check_tensors");
  TORCH_CHECK_VALUE(tensors.size() == layout.size(), "check_tensors: got ", tensors.size(),
                    " tensors for a layout of ", layout.size(), " parameters");
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.defined(), "check_tensors: tensor ", i, " is undefined");
    TORCH_CHECK_VALUE(t.device() == device_, "check_tensors: tensor ", i, " is on ",
                      t.device().str(), " but the arena is on ", device_.str());
    const auto dtype = t.scalar_type();
    TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                     "check_tensors: tensor ", i, " has dtype ", dtype_name(dtype),
                     "; supported dtypes are float16, bfloat16 and float32");
    TORCH_CHECK_VALUE(t.numel() == layout.numels[i], "check_tensors: tensor ", i, " has ",
                      t.numel(), " elements but the layout gives it ", layout.numels[i]);
  }
}

void BlockArena::release() {
  buffer_ = at::Tensor();
  used_bytes_ = 0;
  released_ = true;
}

std::string BlockArena::repr() const {
  std::ostringstream os;
  os << "BlockArena(device=" << device_.str() << ", state=" << spec_.name()
     << ", capacity_numel=" << capacity_numel_ << ", regions=[";
  for (int64_t r = 0; r < num_regions(); ++r) os << (r ? ", " : "") << spec_.regions()[r].name;
  os << "], capacity_bytes=" << capacity_bytes_ << ", used_bytes=" << used_bytes_
     << ", switches=" << switches_ << ", allocations=" << allocations_
     << (released_ ? ", released" : "") << ")";
  return os.str();
}

}  // namespace badam
