#include "host_buffer.h"

#include <c10/util/Exception.h>
#include <c10/util/llvmMathExtras.h>

#include <sstream>

namespace badam {

namespace {

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

}  // namespace

HostBuffer::HostBuffer(int64_t capacity_bytes, bool pinned, int64_t alignment_bytes)
    : alignment_(alignment_bytes), pinned_(pinned) {
  TORCH_CHECK_VALUE(capacity_bytes >= 0, "HostBuffer: capacity_bytes must be >= 0, got ", capacity_bytes);
  TORCH_CHECK_VALUE(alignment_bytes > 0 && (alignment_bytes & (alignment_bytes - 1)) == 0,
                    "HostBuffer: alignment_bytes must be a power of two, got ", alignment_bytes);
  if (capacity_bytes > 0) allocate(capacity_bytes);
}

void HostBuffer::allocate(int64_t capacity_bytes) {
  buffer_ = at::Tensor();  // the old buffer goes first (slices still handed out keep it alive)
  int64_t padded = round_up(capacity_bytes, alignment_);
  int64_t request = padded + alignment_;  // room to align the first slice whatever the base address
  if (pinned_) {
    // torch's pinned-memory allocator rounds every request up to a power of two and page-aligns it:
    // ask for the power of two itself and use all of it, so capacity_bytes is what is held.
    request = static_cast<int64_t>(c10::llvm::PowerOf2Ceil(static_cast<uint64_t>(padded)));
  }
  buffer_ = at::empty({request}, at::TensorOptions().dtype(at::kByte).pinned_memory(pinned_));
  const auto base = reinterpret_cast<uintptr_t>(buffer_.data_ptr());
  shift_ = static_cast<int64_t>(round_up(static_cast<int64_t>(base), alignment_) - static_cast<int64_t>(base));
  capacity_ = pinned_ ? (request - shift_) / alignment_ * alignment_ : padded;
  used_ = 0;
  ++allocations_;
}

void HostBuffer::check_live(const char* what) const {
  TORCH_CHECK(!released_, "HostBuffer.", what, "(): the buffer was released");
}

void HostBuffer::reserve(int64_t capacity_bytes) {
  check_live("reserve");
  TORCH_CHECK_VALUE(capacity_bytes >= 0, "HostBuffer.reserve: capacity_bytes must be >= 0, got ", capacity_bytes);
  if (capacity_bytes <= capacity_) return;
  TORCH_CHECK(used_ == 0, "HostBuffer.reserve: ", used_,
              " bytes of this step are still handed out; reserve before the step or after reset()");
  allocate(capacity_bytes);
}

at::Tensor HostBuffer::acquire(int64_t nbytes) {
  check_live("acquire");
  TORCH_CHECK_VALUE(nbytes > 0, "HostBuffer.acquire: nbytes must be > 0, got ", nbytes);
  const int64_t need = round_up(nbytes, alignment_);
  if (used_ + need > capacity_) {
    // Slices already handed out keep the old buffer alive; new ones come from the larger buffer.
    allocate(std::max<int64_t>(2 * capacity_, used_ + need));
  }
  at::Tensor slice = buffer_.narrow(0, shift_ + used_, nbytes);
  used_ += need;
  peak_ = std::max(peak_, used_);
  return slice;
}

void HostBuffer::reset() {
  check_live("reset");
  used_ = 0;
}

void HostBuffer::release() {
  check_live("release");
  buffer_ = at::Tensor();
  capacity_ = 0;
  used_ = 0;
  released_ = true;
}

std::string HostBuffer::repr() const {
  std::ostringstream out;
  out << "HostBuffer(capacity_bytes=" << capacity_ << ", used_bytes=" << used_ << ", pinned="
      << (pinned_ ? "True" : "False") << ", allocations=" << allocations_
      << (released_ ? ", released" : "") << ")";
  return out.str();
}

}  // namespace badam
