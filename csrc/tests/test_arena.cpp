// C++ tests of the block arena (run by ctest). Plain checks, no test framework.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "arena.h"
#include "check.h"

using badam::ArenaLayout;
using badam::BlockArena;
using badam::StateSpec;

namespace {

using badam_test::g_checks;
using badam_test::g_failures;

// Expect fn() to throw E whose message contains `needle`.
template <typename E = c10::Error>
void expect_throws(const std::function<void()>& fn, const std::string& needle, int line) {
  ++g_checks;
  try {
    fn();
  } catch (const E& e) {
    const std::string message = e.what_without_backtrace();
    if (message.find(needle) == std::string::npos) {
      ++g_failures;
      std::fprintf(stderr, "line %d: message \"%s\" lacks \"%s\"\n", line, message.c_str(),
                   needle.c_str());
    }
    return;
  } catch (const std::exception& e) {
    ++g_failures;
    std::fprintf(stderr, "line %d: wrong exception type: %s\n", line, e.what());
    return;
  }
  ++g_failures;
  std::fprintf(stderr, "line %d: expected an exception containing \"%s\"\n", line,
               needle.c_str());
}

#define EXPECT_THROWS(type, stmt, needle) expect_throws<type>([&] { stmt; }, needle, __LINE__)

uintptr_t addr(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()); }

std::vector<std::vector<int64_t>> flat_shapes(const std::vector<int64_t>& numels) {
  std::vector<std::vector<int64_t>> shapes;
  for (int64_t n : numels) shapes.push_back({n});
  return shapes;
}

// The compact format: codes and per-block scales (as badam_ext.states builds it).
StateSpec eight_bit() {
  return StateSpec("8bit", {{"master", at::kFloat, 1},
                            {"exp_avg", at::kByte, 1},
                            {"exp_avg_scale", at::kFloat, 256},
                            {"exp_avg_sq", at::kByte, 1},
                            {"exp_avg_sq_scale", at::kFloat, 256}});
}

std::vector<StateSpec> specs() { return {StateSpec::fp32(), eight_bit()}; }

void test_alignment(c10::Device device) {
  for (const StateSpec& spec : specs()) {
    const std::vector<int64_t> numels = {3, 77, 1, 250, 300};
    BlockArena arena(badam::required_capacity(numels, spec) + 1, device, spec);
    const int64_t align = spec.element_alignment();
    EXPECT(align == (spec.name() == "fp32" ? 64 : 256));
    for (const auto& name : spec.region_names()) {
      EXPECT(addr(arena.flat(name)) % badam::kAlignmentBytes == 0);
    }
    ArenaLayout layout = arena.layout(numels);
    for (int64_t offset : layout.offsets) EXPECT(offset % align == 0);
    auto views = arena.views(layout, flat_shapes(numels));
    for (int64_t r = 0; r < arena.num_regions(); ++r) {
      const auto& region = spec.regions()[r];
      for (size_t i = 0; i < numels.size(); ++i) {
        if (region.block == 1) {
          EXPECT(addr(views[r][i]) % badam::kAlignmentBytes == 0);
          EXPECT(views[r][i].numel() == numels[i]);
        } else {
          EXPECT(views[r][i].numel() == (numels[i] + region.block - 1) / region.block);
        }
        EXPECT(views[r][i].scalar_type() == region.dtype);
      }
    }
  }
}

void test_regions_disjoint_inside_buffer(c10::Device device) {
  for (const StateSpec& spec : specs()) {
    BlockArena arena(1000, device, spec);
    const at::Tensor buffer = arena.buffer();
    EXPECT(buffer.scalar_type() == at::kByte);
    EXPECT(buffer.numel() == arena.capacity_bytes());
    EXPECT(arena.capacity_bytes() == spec.bytes(1000) + badam::kAlignmentBytes - 1);
    const uintptr_t begin = addr(buffer);
    const uintptr_t end = begin + static_cast<uintptr_t>(arena.capacity_bytes());
    std::vector<std::pair<uintptr_t, uintptr_t>> spans;
    for (const auto& name : spec.region_names()) {
      const at::Tensor region = arena.flat(name);
      EXPECT(region.is_contiguous());
      EXPECT(region.storage().data() == buffer.storage().data());
      const uintptr_t lo = addr(region);
      const uintptr_t hi = lo + static_cast<uintptr_t>(region.numel() * region.element_size());
      EXPECT(lo >= begin && hi <= end);
      for (const auto& other : spans) EXPECT(hi <= other.first || lo >= other.second);
      spans.emplace_back(lo, hi);
    }
  }
}

void test_spec_sizes() {
  const StateSpec fp32 = StateSpec::fp32();
  EXPECT(fp32.bytes(1) == 3 * 256);
  EXPECT(fp32.bytes(1000) == 12 * 1024);
  const StateSpec q = eight_bit();
  // 1024 elements: master 4096 B, codes 2 x 1024 B, scales 2 x (4 items x 4 B, padded to 256)
  EXPECT(q.bytes(1000) == 4096 + 2 * 1024 + 2 * 256);
  EXPECT(q.items(q.index("exp_avg_scale"), 257) == 2);
  EXPECT_THROWS(c10::ValueError, StateSpec("x", {}), "at least one region");
  EXPECT_THROWS(c10::ValueError, StateSpec("x", {{"a", at::kFloat, 1}, {"a", at::kByte, 1}}),
                "region 'a' appears twice");
  EXPECT_THROWS(c10::TypeError, StateSpec("x", {{"a", at::kDouble, 1}}), "dtype float64");
  EXPECT_THROWS(c10::ValueError, StateSpec("x", {{"a", at::kFloat, 3}}), "block 3");
  EXPECT_THROWS(c10::ValueError, q.index("momentum"),
                "unknown region 'momentum'; the '8bit' state has master, exp_avg");
}

void test_views_alias(c10::Device device) {
  BlockArena arena(4096, device);
  const std::vector<int64_t> numels = {6, 65, 1};
  ArenaLayout layout = arena.layout(numels);
  EXPECT((layout.offsets == std::vector<int64_t>{0, 64, 192}));
  EXPECT(layout.total_numel == 256);
  auto views = arena.views(layout, {{2, 3}, {5, 13}, {}});
  EXPECT(views.size() == 3);
  const auto names = arena.spec().region_names();
  for (int64_t r = 0; r < 3; ++r) {
    EXPECT(views[r][0].sizes() == at::IntArrayRef({2, 3}));
    EXPECT(views[r][1].sizes() == at::IntArrayRef({5, 13}));
    EXPECT(views[r][2].dim() == 0);
    // view -> flat
    views[r][1].fill_(static_cast<float>(r + 1));
    const at::Tensor flat = arena.flat(names[r]);
    EXPECT(flat.narrow(0, 64, 65).eq(static_cast<float>(r + 1)).all().item<bool>());
    // flat -> view
    flat.narrow(0, 192, 1).fill_(-5.0f);
    EXPECT(views[r][2].item<float>() == -5.0f);
    flat.narrow(0, 0, 6).copy_(at::arange(6, flat.options()));
    EXPECT(views[r][0].flatten().equal(at::arange(6, flat.options())));
  }
  // Regions do not overlap: region 1's write left region 0 alone.
  EXPECT(views[0][1].eq(1.0f).all().item<bool>());
}

void test_switches_never_allocate(c10::Device device) {
  const std::vector<std::vector<int64_t>> blocks = {
      {1000}, {1, 2, 3}, {4000, 17}, {63, 64, 65, 66}, {4095}, {5}};
  const StateSpec spec = StateSpec::fp32();
  int64_t largest = 0;
  for (const auto& numels : blocks) {
    largest = std::max(largest, badam::required_capacity(numels, spec));
  }
  BlockArena arena(largest, device);
  const at::Tensor buffer = arena.buffer();
  const void* storage = buffer.storage().data();
  EXPECT(arena.used_bytes() == 0);
  for (int round = 0; round < 3; ++round) {
    for (const auto& numels : blocks) {
      ArenaLayout layout = arena.layout(numels);
      auto views = arena.views(layout, flat_shapes(numels));
      EXPECT(arena.used_bytes() == layout.total_numel * 4 * 3);
      for (const auto& region : views) {
        for (const auto& view : region) EXPECT(view.storage().data() == storage);
      }
      EXPECT(arena.buffer().storage().data() == storage);
      EXPECT(addr(arena.buffer()) == addr(buffer));
      EXPECT(arena.allocations() == 1);
    }
  }
  EXPECT(arena.switches() == static_cast<int64_t>(3 * blocks.size()));
}

// Growth is an allocation: the counter moves, old layouts are refused, old views stay valid.
void test_reserve_counts_allocations(c10::Device device) {
  BlockArena arena(100, device);
  EXPECT(arena.allocations() == 1);
  ArenaLayout small = arena.layout({100});
  auto old_views = arena.views(small, {{100}});
  old_views[0][0].fill_(2.0f);
  EXPECT(!arena.reserve(100));
  EXPECT(arena.allocations() == 1);
  EXPECT(arena.reserve(5000));
  EXPECT(arena.allocations() == 2 && arena.capacity_numel() == 5000);
  EXPECT(arena.capacity_bytes() == 3 * 5056 * 4 + badam::kAlignmentBytes - 1);
  EXPECT(arena.used_bytes() == 0);
  EXPECT_THROWS(c10::ValueError, arena.views(small, {{100}}), "before it grew");
  arena.views(arena.layout({5000}), {{5000}});
  EXPECT(old_views[0][0].eq(2.0f).all().item<bool>());
  EXPECT_THROWS(c10::ValueError, arena.reserve(0), "capacity_numel must be > 0");
}

void test_required_capacity() {
  const StateSpec fp32 = StateSpec::fp32();
  EXPECT(badam::required_capacity({1}, fp32) == 64);
  EXPECT(badam::required_capacity({64}, fp32) == 64);
  EXPECT(badam::required_capacity({65, 1}, fp32) == 192);
  EXPECT(badam::required_capacity({65, 1}, eight_bit()) == 512);
  EXPECT_THROWS(c10::ValueError, badam::required_capacity({}, fp32), "empty block");
  EXPECT_THROWS(c10::ValueError, badam::required_capacity({5, -1}, fp32), "parameter 1 has numel -1");
}

void test_errors(c10::Device device) {
  EXPECT_THROWS(c10::ValueError, BlockArena(0, device), "capacity_numel must be > 0, got 0");
  EXPECT_THROWS(c10::ValueError, BlockArena(-3, device), "capacity_numel must be > 0, got -3");
  EXPECT_THROWS(c10::ValueError, BlockArena(10, c10::Device(c10::kMeta)),
                "supports cpu and cuda devices, got meta");

  BlockArena arena(1000000, device);
  EXPECT_THROWS(c10::ValueError, arena.layout({}),
                "empty block: a block needs at least one parameter");
  EXPECT_THROWS(c10::ValueError, arena.layout({1, 2, 3, 0}), "parameter 3 has numel 0");
  EXPECT_THROWS(c10::ValueError, arena.layout({1234560}),
                "block needs 1,234,560 elements (padded) but the arena holds 1,000,000: "
                "234,560 over; create the arena with capacity_numel >= 1234560");
  EXPECT_THROWS(c10::ValueError, arena.layout({INT64_MAX - 2, 10}), "overflows int64");

  ArenaLayout layout = arena.layout({6, 10});
  EXPECT_THROWS(c10::ValueError, arena.views(layout, {{6}}), "got 1 shapes for a layout of 2");
  EXPECT_THROWS(c10::ValueError, arena.views(layout, {{2, 3}, {3, 3}}),
                "shape [3, 3] of parameter 1 has 9 elements but the layout gives it 10");
  EXPECT_THROWS(c10::ValueError, arena.views(layout, {{-2, -3}, {10}}), "negative size");
  EXPECT(arena.switches() == 0);  // failed calls count nothing

  BlockArena other(1000000, device);
  ArenaLayout foreign = other.layout({6, 10});
  EXPECT_THROWS(c10::ValueError, arena.views(foreign, {{6}, {10}}), "another BlockArena");
  EXPECT_THROWS(c10::ValueError, arena.check_tensors(foreign, {}), "another BlockArena");
  BlockArena bigger(2000000, device);
  ArenaLayout too_big = bigger.layout({1500000});
  EXPECT_THROWS(c10::ValueError, arena.views(too_big, {{1500000}}),
                "spans 1,500,032 elements but this arena holds 1,000,000");

  EXPECT_THROWS(c10::ValueError, arena.flat("momentum"), "unknown region 'momentum'");

  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  EXPECT_THROWS(c10::ValueError, arena.check_tensors(layout, {at::empty({6}, f32)}),
                "got 1 tensors for a layout of 2");
  EXPECT_THROWS(c10::TypeError,
                arena.check_tensors(layout, {at::empty({6}, f32.dtype(at::kDouble)),
                                             at::empty({10}, f32)}),
                "tensor 0 has dtype float64");
  EXPECT_THROWS(c10::ValueError,
                arena.check_tensors(layout, {at::empty({6}, f32), at::empty({11}, f32)}),
                "tensor 1 has 11 elements but the layout gives it 10");
  EXPECT_THROWS(c10::ValueError,
                arena.check_tensors(layout, {at::empty({6}, f32), at::empty({10}, f32.device(c10::kMeta))}),
                "tensor 1 is on meta but the arena is on " + arena.device().str());
  // Accepted: every supported dtype, any shape with the right numel.
  arena.check_tensors(layout, {at::empty({2, 3}, f32.dtype(at::kBFloat16)),
                               at::empty({10}, f32.dtype(at::kHalf))});
  arena.check_tensors(layout, {at::empty({6}, f32), at::empty({5, 2}, f32)});
}

// A block fits when its parameters do: the padding after the last one needs no capacity.
void test_capacity_is_the_end_of_the_last_parameter(c10::Device device) {
  BlockArena arena(1000, device);
  EXPECT(arena.capacity_padded() == 1024);
  ArenaLayout layout = arena.layout({1000});
  EXPECT(layout.total_numel == 1024);
  auto views = arena.views(layout, {{10, 100}});
  EXPECT(views[0][0].numel() == 1000);
  EXPECT(arena.layout({900, 36}).total_numel == 1024);  // offsets 0, 960: ends at 996
  EXPECT_THROWS(c10::ValueError, arena.layout({1001}),
                "block needs 1,024 elements (padded), 1,001 up to the end of its last parameter, "
                "but the arena holds 1,000: 1 over; create the arena with capacity_numel >= 1001");
  EXPECT_THROWS(c10::ValueError, arena.layout({999, 1}), "capacity_numel >= 1025");
  BlockArena bigger(2000, device);
  EXPECT_THROWS(c10::ValueError, arena.views(bigger.layout({1001}), {{1001}}),
                "spans 1,024 elements but this arena holds 1,000 (its last parameter ends at "
                "element 1,001)");
}

void test_release(c10::Device device) {
  BlockArena arena(512, device);
  ArenaLayout layout = arena.layout({100});
  auto views = arena.views(layout, {{100}});
  views[0][0].fill_(3.0f);
  arena.release();
  EXPECT(arena.released());
  arena.release();  // idempotent
  const std::string msg = "BlockArena used after release()";
  EXPECT_THROWS(c10::Error, arena.layout({1}), msg);
  EXPECT_THROWS(c10::Error, arena.views(layout, {{100}}), msg);
  EXPECT_THROWS(c10::Error, arena.flat("master"), msg);
  EXPECT_THROWS(c10::Error, arena.buffer(), msg);
  EXPECT_THROWS(c10::Error, arena.reserve(1024), msg);
  EXPECT_THROWS(c10::Error, arena.check_tensors(layout, {}), msg);
  // Views handed out earlier keep the storage alive.
  EXPECT(views[0][0].eq(3.0f).all().item<bool>());
  EXPECT(arena.capacity_numel() == 512);
  EXPECT(arena.used_bytes() == 0);
}

void run_all(c10::Device device) {
  std::printf("device %s\n", device.str().c_str());
  test_alignment(device);
  test_regions_disjoint_inside_buffer(device);
  test_views_alias(device);
  test_switches_never_allocate(device);
  test_reserve_counts_allocations(device);
  test_errors(device);
  test_capacity_is_the_end_of_the_last_parameter(device);
  test_release(device);
}

}  // namespace

int main() {
  try {
    test_required_capacity();
    test_spec_sizes();
    run_all(c10::Device(c10::kCPU));
    if (at::hasCUDA()) run_all(c10::Device(c10::kCUDA, 0));
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "unexpected exception: %s\n", e.what_without_backtrace());
    return 1;
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
