// Python bindings for the block arena: badam_ext._C.
#include <torch/csrc/utils/pybind.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "arena.h"

namespace badam {
void bind_host_buffer(pybind11::module_& m);  // host_buffer_bindings.cpp
}

namespace py = pybind11;
using badam::ArenaLayout;
using badam::BlockArena;
using badam::RegionSpec;
using badam::StateSpec;

namespace {

// Accept torch.device or a device string ("cpu", "cuda:0").
c10::Device to_device(const py::handle& obj) {
  if (py::isinstance<py::str>(obj)) return c10::Device(obj.cast<std::string>());
  try {
    return obj.cast<c10::Device>();
  } catch (const py::cast_error&) {
    throw py::type_error("device must be a torch.device or a string such as 'cpu' or 'cuda:0', got " +
                         py::str(py::type::handle_of(obj)).cast<std::string>());
  }
}

// c10 errors carry a C++ backtrace in what(); Python users get the message, as torch does, and
// c10::ValueError / c10::TypeError become ValueError / TypeError.
void translate_c10_errors(std::exception_ptr error) {
  try {
    if (error) std::rethrow_exception(error);
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
  } catch (const c10::IndexError& e) {
    PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "badam_ext C++ extension: the block arena (the active block's optimizer state, laid out "
            "from a StateSpec) and the pinned host buffer";
  py::register_local_exception_translator(translate_c10_errors);
  badam::bind_host_buffer(m);

  m.attr("ALIGNMENT_BYTES") = badam::kAlignmentBytes;

  py::class_<StateSpec>(m, "StateSpec",
                        "The optimizer state of one element as data: named regions, each with a "
                        "dtype and a block (1: one item per element; N: one item per N elements, "
                        "e.g. a quantization scale).")
      .def(py::init([](std::string name, const std::vector<py::tuple>& regions) {
             std::vector<RegionSpec> out;
             for (const auto& region : regions) {
               if (region.size() != 3)
                 // std::invalid_argument reaches Python as ValueError; py::repr keeps older pybind11
                 // (torch's bundled headers) unambiguous, where py::str(tuple) is not
                 throw std::invalid_argument("StateSpec: each region is (name, dtype, block), got " +
                                             std::string(py::repr(region)));
               out.push_back({region[0].cast<std::string>(), region[1].cast<at::ScalarType>(),
                              region[2].cast<int64_t>()});
             }
             return StateSpec(std::move(name), std::move(out));
           }),
           py::arg("name"), py::arg("regions"))
      .def_static("fp32", &StateSpec::fp32, "The default: fp32 master, exp_avg, exp_avg_sq.")
      .def_property_readonly("name", &StateSpec::name)
      .def_property_readonly("region_names", &StateSpec::region_names)
      .def_property_readonly(
          "regions",
          [](const StateSpec& spec) {
            py::list out;
            for (const auto& r : spec.regions()) out.append(py::make_tuple(r.name, r.dtype, r.block));
            return out;
          },
          "[(name, dtype, block), ...] in layout order")
      .def_property_readonly("element_alignment", &StateSpec::element_alignment,
                             "parameter offsets are multiples of this many elements")
      .def("has", &StateSpec::has, py::arg("region"))
      .def(
          "dtype", [](const StateSpec& s, const std::string& r) { return s.regions()[s.index(r)].dtype; },
          py::arg("region"))
      .def(
          "block", [](const StateSpec& s, const std::string& r) { return s.regions()[s.index(r)].block; },
          py::arg("region"))
      .def(
          "items", [](const StateSpec& s, const std::string& r, int64_t n) { return s.items(s.index(r), n); },
          py::arg("region"), py::arg("numel"), "items of a region for numel elements")
      .def("bytes", &StateSpec::bytes, py::arg("numel"),
           "bytes of every region for a capacity of numel elements (each region padded to "
           "ALIGNMENT_BYTES)")
      .def("__eq__", [](const StateSpec& a, const StateSpec& b) { return a.repr() == b.repr(); })
      .def("__hash__", [](const StateSpec& s) { return py::hash(py::str(s.repr())); })
      .def("__repr__", &StateSpec::repr);

  py::class_<ArenaLayout>(m, "ArenaLayout",
                          "Per-parameter element offsets of one block inside a BlockArena (the same "
                          "in every region). Made by BlockArena.layout().")
      .def_property_readonly(
          "offsets", [](const ArenaLayout& l) { return l.offsets; },
          "element offset of each parameter (a multiple of the spec's element_alignment)")
      .def_property_readonly(
          "numels", [](const ArenaLayout& l) { return l.numels; }, "numel of each parameter")
      .def_property_readonly(
          "total_numel", [](const ArenaLayout& l) { return l.total_numel; },
          "end of the last parameter, rounded up to the alignment")
      .def("__len__", &ArenaLayout::size)
      .def("__repr__", &ArenaLayout::repr);

  m.def("required_capacity", &badam::required_capacity, py::arg("numels"), py::arg("spec"),
        "Padded element total of a block with these parameter numels under spec: the smallest "
        "capacity_numel of an arena that can hold it.");

  py::class_<BlockArena>(m, "BlockArena",
                         "The active block's optimizer state: every region of a StateSpec in one "
                         "device allocation, sized for the largest block. Views handed out before "
                         "release() keep the memory alive while they live.")
      .def(py::init([](const py::object& capacity_numel, const py::object& device,
                       const py::object& spec) {
             // pybind11's int64_t would take True as 1: a capacity must be an int, never a bool
             if (py::isinstance<py::bool_>(capacity_numel) || !PyIndex_Check(capacity_numel.ptr()))
               throw py::type_error("capacity_numel must be an int, got " +
                                    py::str(py::type::handle_of(capacity_numel)).cast<std::string>());
             if (!spec.is_none() && !py::isinstance<StateSpec>(spec))
               throw py::type_error("spec must be a StateSpec (badam_ext.states.state_spec()) or None, got " +
                                    py::str(py::type::handle_of(spec)).cast<std::string>());
             StateSpec state = spec.is_none() ? StateSpec::fp32() : spec.cast<StateSpec>();
             return new BlockArena(py::int_(capacity_numel).cast<int64_t>(), to_device(device),
                                   std::move(state));
           }),
           py::arg("capacity_numel"), py::arg("device"), py::arg("spec") = py::none())
      .def("layout", &BlockArena::layout, py::arg("numels"),
           "ArenaLayout for a block whose parameters have these numels, in order.")
      .def(
          "views",
          [](BlockArena& arena, const ArenaLayout& layout,
             const std::vector<std::vector<int64_t>>& shapes) {
            auto regions = arena.views(layout, shapes);
            const auto names = arena.spec().region_names();
            py::dict out;
            for (size_t r = 0; r < regions.size(); ++r) out[py::str(names[r])] = py::cast(regions[r]);
            return out;
          },
          py::arg("layout"), py::arg("shapes"),
          "{region: [one view per parameter]} in spec order: per-element regions with the given "
          "shapes, blocked regions 1-D (ceil(numel / block) items). Counts one switch.")
      .def("flat", &BlockArena::flat, py::arg("name"),
           "1-D view of a whole region in its dtype, capacity_numel elements (blocked regions: "
           "their items).")
      .def("buffer", &BlockArena::buffer,
           "The whole allocation (alignment slack included) as a 1-D uint8 tensor.")
      .def("reserve", &BlockArena::reserve, py::arg("capacity_numel"),
           "Grow to hold blocks of capacity_numel elements: a new allocation when the current one is "
           "too small (contents not kept, earlier layouts refused). Returns whether it allocated.")
      .def("check_tensors", &BlockArena::check_tensors, py::arg("layout"), py::arg("tensors"),
           "Raise unless the tensors are on the arena's device, fp16/bf16/fp32, and match the "
           "layout's numels.")
      .def("release", &BlockArena::release,
           "Drop the arena's buffer; any later use of the arena raises. Idempotent.")
      .def_property_readonly("spec", &BlockArena::spec)
      .def_property_readonly("capacity_numel", &BlockArena::capacity_numel)
      .def_property_readonly("capacity_padded", &BlockArena::capacity_padded)
      .def_property_readonly("capacity_bytes", &BlockArena::capacity_bytes)
      .def_property_readonly("used_bytes", &BlockArena::used_bytes)
      .def_property_readonly("allocations", &BlockArena::allocations,
                             "device allocations made so far (the constructor's and each growth)")
      .def_property_readonly("switches", &BlockArena::switches)
      .def_property_readonly("device", &BlockArena::device)
      .def_property_readonly("released", &BlockArena::released)
      .def_property_readonly("num_regions", &BlockArena::num_regions)
      .def("__repr__", &BlockArena::repr);
}
