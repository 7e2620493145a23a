// C++ tests of the host buffer for offloaded checkpoints (run by ctest). Plain checks.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "check.h"
#include "host_buffer.h"

using badam::HostBuffer;

namespace {

using badam_test::g_checks;
using badam_test::g_failures;

#define EXPECT_THROWS(stmt, needle)                                                          \
  do {                                                                                       \
    ++g_checks;                                                                              \
    bool thrown = false;                                                                     \
    try {                                                                                    \
      stmt;                                                                                  \
    } catch (const c10::Error& e) {                                                          \
      thrown = std::string(e.what_without_backtrace()).find(needle) != std::string::npos;    \
      if (!thrown) std::fprintf(stderr, "line %d: message lacks \"%s\"\n", __LINE__, needle); \
    }                                                                                        \
    if (!thrown) ++g_failures;                                                               \
  } while (0)

uintptr_t addr(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()); }

void test_slices_are_aligned_and_disjoint() {
  HostBuffer buf(4096, /*pinned=*/false, 256);
  EXPECT(buf.allocations() == 1);
  EXPECT(buf.capacity_bytes() == 4096);
  at::Tensor a = buf.acquire(100);
  at::Tensor b = buf.acquire(300);
  EXPECT(a.numel() == 100 && b.numel() == 300);
  EXPECT(a.scalar_type() == at::kByte);
  EXPECT(addr(a) % 256 == 0 && addr(b) % 256 == 0);
  EXPECT(addr(b) >= addr(a) + 256);  // 100 bytes round up to one 256-byte slot
  EXPECT(buf.used_bytes() == 256 + 512);
  a.fill_(1);
  b.fill_(2);
  EXPECT(a.sum().item<int64_t>() == 100);  // b did not overwrite a
  buf.reset();
  EXPECT(buf.used_bytes() == 0);
  EXPECT(buf.peak_bytes() == 768);
  at::Tensor c = buf.acquire(100);
  EXPECT(addr(c) == addr(a));  // the same memory is reused after reset
  EXPECT(buf.allocations() == 1);
}

void test_growth_is_counted_and_keeps_old_slices() {
  HostBuffer buf(512, false, 256);
  at::Tensor a = buf.acquire(512);
  a.fill_(7);
  at::Tensor b = buf.acquire(1000);  // does not fit: a new, larger allocation
  EXPECT(buf.allocations() == 2);
  EXPECT(buf.capacity_bytes() >= 1024);
  EXPECT(a.sum().item<int64_t>() == 7 * 512);  // the old slice is still valid
  b.fill_(1);
  EXPECT(a.sum().item<int64_t>() == 7 * 512);
}

void test_reserve() {
  HostBuffer buf(0, false, 64);
  EXPECT(buf.allocations() == 0);
  buf.reserve(1000);
  EXPECT(buf.allocations() == 1);
  EXPECT(buf.capacity_bytes() == 1024);
  buf.reserve(512);  // fits: no allocation
  EXPECT(buf.allocations() == 1);
  buf.acquire(10);
  EXPECT_THROWS(buf.reserve(1 << 20), "still handed out");
  buf.reset();
  buf.reserve(1 << 20);
  EXPECT(buf.allocations() == 2);
}

void test_errors() {
  EXPECT_THROWS(HostBuffer(-1, false), "capacity_bytes must be >= 0");
  EXPECT_THROWS(HostBuffer(10, false, 100), "power of two");
  HostBuffer buf(256, false);
  EXPECT_THROWS(buf.acquire(0), "nbytes must be > 0");
  buf.release();
  EXPECT(buf.released());
  EXPECT_THROWS(buf.acquire(1), "released");
  EXPECT_THROWS(buf.reset(), "released");
}

}  // namespace

int main() {
  test_slices_are_aligned_and_disjoint();
  test_growth_is_counted_and_keeps_old_slices();
  test_reserve();
  test_errors();
  std::printf("test_host_buffer: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
