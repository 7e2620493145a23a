// Plain checks for the C++ tests (no test framework): EXPECT counts checks and failures.
#pragma once

#include <cstdio>

namespace badam_test {
inline int g_failures = 0;
inline int g_checks = 0;
}  // namespace badam_test

#define EXPECT(cond)                                                                 \
  do {                                                                              \
    ++badam_test::g_checks;                                                         \
    if (!(cond)) {                                                                  \
      ++badam_test::g_failures;                                                     \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                               \
  } while (0)
