#include "arena.h"

#include <atomic>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace badam {
namespace {

constexpr int64_t kFloatBytes = 4;
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

void check_alignment(int64_t alignment_bytes) {
  TORCH_CHECK_VALUE(alignment_bytes >= kFloatBytes && alignment_bytes % kFloatBytes == 0 &&
                        (alignment_bytes & (alignment_bytes - 1)) == 0,
                    "alignment_bytes must be a power of two >= 4 (a whole number of fp32 "
                    "elements), got ",
                    alignment_bytes);
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

// Aligned offsets of consecutive parameters; returns the padded total. `data_end`, when given,
// receives the end of the last parameter without the padding after it.
int64_t place(const std::vector<int64_t>& numels, int64_t alignment_bytes,
              std::vector<int64_t>* offsets, int64_t* data_end = nullptr) {
  check_alignment(alignment_bytes);
  TORCH_CHECK_VALUE(!numels.empty(), "empty block: a block needs at least one parameter");
  const int64_t align_elems = alignment_bytes / kFloatBytes;
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

std::string ArenaLayout::repr() const {
  std::ostringstream os;
  os << "ArenaLayout(params=" << size() << ", total_numel=" << total_numel
     << ", offsets=" << list_repr(offsets) << ", numels=" << list_repr(numels) << ")";
  return os.str();
}

int64_t required_capacity(const std::vector<int64_t>& numels, int64_t alignment_bytes) {
  return place(numels, alignment_bytes, nullptr);
}

const std::vector<std::string>& BlockArena::region_names() {
  static const std::vector<std::string> names = {"master", "exp_avg", "exp_avg_sq", "grad"};
  return names;
}

BlockArena::BlockArena(int64_t capacity_numel, c10::Device device, bool with_grad,
                       int64_t alignment_bytes)
    : capacity_numel_(capacity_numel),
      capacity_padded_(0),
      alignment_bytes_(alignment_bytes),
      num_regions_(with_grad ? 4 : 3),
      with_grad_(with_grad),
      device_(device),
      id_(g_next_arena_id.fetch_add(1)) {
  TORCH_CHECK_VALUE(capacity_numel > 0, "capacity_numel must be > 0, got ", capacity_numel);
  check_alignment(alignment_bytes);
  TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(),
                    "BlockArena supports cpu and cuda devices, got ", device.str());
  TORCH_CHECK(!device.is_cuda() || at::hasCUDA(), "BlockArena on ", device.str(),
              ": this torch build has no usable CUDA device");
  const int64_t align_elems = alignment_bytes / kFloatBytes;
  capacity_padded_ = round_up(capacity_numel, align_elems, "capacity_numel");
  // The allocator only promises its own alignment (64 bytes on CPU): allocate align_elems - 1
  // spare elements and start region 0 at the first aligned address inside the buffer.
  const int64_t elements = checked_add(
      checked_mul(capacity_padded_, num_regions_, "arena size"), align_elems - 1, "arena size");
  checked_mul(elements, kFloatBytes, "arena size in bytes");
  buffer_ = at::empty({elements}, at::TensorOptions().dtype(at::kFloat).device(device));
  allocations_ = 1;
  device_ = buffer_.device();  // "cuda" -> "cuda:<current>"
  const auto address = reinterpret_cast<uintptr_t>(buffer_.data_ptr());
  const auto alignment = static_cast<uintptr_t>(alignment_bytes);
  const uintptr_t misalignment = address % alignment;
  TORCH_INTERNAL_ASSERT(misalignment % kFloatBytes == 0, "fp32 buffer is not 4-byte aligned");
  base_offset_ =
      misalignment == 0 ? 0 : static_cast<int64_t>((alignment - misalignment) / kFloatBytes);
  capacity_bytes_ = elements * kFloatBytes;
}

void BlockArena::check_alive() const { TORCH_CHECK(!released_, kReleasedMessage); }

void BlockArena::check_layout(const ArenaLayout& layout, const char* caller) const {
  TORCH_CHECK_VALUE(data_end(layout) <= capacity_numel_, caller, ": the layout spans ",
                    with_commas(layout.total_numel), " elements but this arena holds ",
                    with_commas(capacity_numel_), " (its last parameter ends at element ",
                    with_commas(data_end(layout)), ")");
  TORCH_CHECK_VALUE(layout.arena_id == id_, caller,
                    ": the layout was made by another BlockArena; make it with this arena's "
                    "layout()");
  TORCH_INTERNAL_ASSERT(layout.offsets.size() == layout.numels.size());
}

at::Tensor BlockArena::region(int64_t index, int64_t length) const {
  return buffer_.narrow(0, base_offset_ + index * capacity_padded_, length);
}

ArenaLayout BlockArena::layout(const std::vector<int64_t>& numels) const {
  check_alive();
  ArenaLayout out;
  int64_t end = 0;
  out.total_numel = place(numels, alignment_bytes_, &out.offsets, &end);
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
  std::vector<std::vector<at::Tensor>> out(num_regions_);
  for (int64_t r = 0; r < num_regions_; ++r) {
    const at::Tensor whole = region(r, capacity_numel_);
    out[r].reserve(shapes.size());
    for (size_t i = 0; i < shapes.size(); ++i) {
      out[r].push_back(whole.narrow(0, layout.offsets[i], layout.numels[i]).view(shapes[i]));
    }
  }
  switches_ += 1;
  used_bytes_ = layout.total_numel * kFloatBytes * num_regions_;
  return out;
}

at::Tensor BlockArena::flat(const std::string& name) const {
  check_alive();
  const auto& names = region_names();
  for (int64_t r = 0; r < static_cast<int64_t>(names.size()); ++r) {
    if (names[r] != name) continue;
    TORCH_CHECK_VALUE(r < num_regions_, "flat('", name,
                      "'): this arena has no grad region (create it with with_grad=True)");
    return region(r, capacity_numel_);
  }
  TORCH_CHECK_VALUE(false, "flat: unknown region '", name,
                    "'; expected one of master, exp_avg, exp_avg_sq, grad");
  return {};
}

at::Tensor BlockArena::buffer() const {
  check_alive();
  return buffer_.alias();
}

void BlockArena::zero_state(const ArenaLayout& layout) {
  check_alive();
  check_layout(layout, "zero_state");
  region(kExpAvg, layout.total_numel).zero_();
  region(kExpAvgSq, layout.total_numel).zero_();
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
  os << "BlockArena(device=" << device_.str() << ", capacity_numel=" << capacity_numel_
     << ", regions=[";
  for (int64_t r = 0; r < num_regions_; ++r) os << (r ? ", " : "") << region_names()[r];
  os << "], alignment_bytes=" << alignment_bytes_ << ", capacity_bytes=" << capacity_bytes_
     << ", used_bytes=" << used_bytes_ << ", switches=" << switches_
     << ", allocations=" << allocations_ << (released_ ? ", released" : "") << ")";
  return os.str();
}

}  // namespace badam
