// Python bindings for the block arena: badam_ext._C.
#include <torch/csrc/utils/pybind.h>

#include <string>
#include <vector>

#include "arena.h"

namespace badam {
void bind_host_buffer(pybind11::module_& m);  // host_buffer_bindings.cpp
}

namespace py = pybind11;
using badam::ArenaLayout;
using badam::BlockArena;

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
  m.doc() = "badam_ext C++ extension: the block arena for the active BAdam block's fp32 state";
  py::register_local_exception_translator(translate_c10_errors);
  badam::bind_host_buffer(m);

  py::class_<ArenaLayout>(m, "ArenaLayout",
                          "Per-parameter element offsets of one block inside a BlockArena. "
                          "Made by BlockArena.layout().")
      .def_property_readonly(
          "offsets", [](const ArenaLayout& l) { return l.offsets; },
          "element offset of each parameter (a multiple of alignment_bytes / 4)")
      .def_property_readonly(
          "numels", [](const ArenaLayout& l) { return l.numels; }, "numel of each parameter")
      .def_property_readonly(
          "total_numel", [](const ArenaLayout& l) { return l.total_numel; },
          "end of the last parameter, rounded up to the alignment")
      .def("__len__", &ArenaLayout::size)
      .def("__repr__", &ArenaLayout::repr);

  m.def("required_capacity", &badam::required_capacity, py::arg("numels"),
        py::arg("alignment_bytes") = 256,
        "Padded element total of a block with these parameter numels: the smallest "
        "capacity_numel of an arena that can hold it.");

  py::class_<BlockArena>(m, "BlockArena",
                         "One device allocation holding the active block's fp32 master weights, "
                         "exp_avg, exp_avg_sq and (with_grad=True) fp32 gradients. Views handed "
                         "out before release() keep the memory alive while they live.")
      .def(py::init([](const py::object& capacity_numel, const py::object& device, bool with_grad,
                       int64_t alignment_bytes) {
             // pybind11's int64_t would take True as 1: a capacity must be an int, never a bool
             if (py::isinstance<py::bool_>(capacity_numel) || !PyIndex_Check(capacity_numel.ptr()))
               throw py::type_error("capacity_numel must be an int, got " +
                                    py::str(py::type::handle_of(capacity_numel)).cast<std::string>());
             return new BlockArena(py::int_(capacity_numel).cast<int64_t>(), to_device(device),
                                   with_grad, alignment_bytes);
           }),
           py::arg("capacity_numel"), py::arg("device"), py::arg("with_grad") = false,
           py::arg("alignment_bytes") = 256)
      .def("layout", &BlockArena::layout, py::arg("numels"),
           "ArenaLayout for a block whose parameters have these numels, in order.")
      .def(
          "views",
          [](BlockArena& arena, const ArenaLayout& layout,
             const std::vector<std::vector<int64_t>>& shapes) {
            auto regions = arena.views(layout, shapes);
            py::tuple out(regions.size());
            for (size_t r = 0; r < regions.size(); ++r) out[r] = py::cast(regions[r]);
            return out;
          },
          py::arg("layout"), py::arg("shapes"),
          "(master, exp_avg, exp_avg_sq[, grad]): lists of fp32 tensors of the given shapes "
          "aliasing the arena. Counts one switch.")
      .def("flat", &BlockArena::flat, py::arg("name"),
           "1-D fp32 view of a whole region ('master', 'exp_avg', 'exp_avg_sq', 'grad'), "
           "capacity_numel long.")
      .def("buffer", &BlockArena::buffer,
           "The whole allocation (alignment padding included) as a 1-D fp32 tensor.")
      .def("zero_state", &BlockArena::zero_state, py::arg("layout"),
           "Zero exp_avg and exp_avg_sq over the layout's span.")
      .def("check_tensors", &BlockArena::check_tensors, py::arg("layout"), py::arg("tensors"),
           "Raise unless the tensors are on the arena's device, fp16/bf16/fp32, and match the "
           "layout's numels.")
      .def("release", &BlockArena::release,
           "Drop the arena's buffer; any later use of the arena raises. Idempotent.")
      .def_property_readonly("capacity_numel", &BlockArena::capacity_numel)
      .def_property_readonly("capacity_padded", &BlockArena::capacity_padded)
      .def_property_readonly("capacity_bytes", &BlockArena::capacity_bytes)
      .def_property_readonly("used_bytes", &BlockArena::used_bytes)
      .def_property_readonly("allocations", &BlockArena::allocations)
      .def_property_readonly("switches", &BlockArena::switches)
      .def_property_readonly("device", &BlockArena::device)
      .def_property_readonly("alignment_bytes", &BlockArena::alignment_bytes)
      .def_property_readonly("with_grad", &BlockArena::with_grad)
      .def_property_readonly("released", &BlockArena::released)
      .def_property_readonly("num_regions", &BlockArena::num_regions)
      .def("__repr__", &BlockArena::repr);
}
