// Python bindings for HostBuffer (part of badam_ext._C; registered from bindings.cpp).
#include <torch/csrc/utils/pybind.h>

#include "host_buffer.h"

namespace py = pybind11;

namespace badam {

void bind_host_buffer(py::module_& m) {
  py::class_<HostBuffer>(m, "HostBuffer",
                         "One host allocation (pinned with pinned=True) for offloaded checkpoint "
                         "inputs: a bump allocator reset every step. Slices handed out keep their "
                         "memory alive while they live.")
      .def(py::init([](const py::object& capacity_bytes, bool pinned, int64_t alignment_bytes) {
             if (py::isinstance<py::bool_>(capacity_bytes) || !PyIndex_Check(capacity_bytes.ptr()))
               throw py::type_error("capacity_bytes must be an int, got " +
                                    py::str(py::type::handle_of(capacity_bytes)).cast<std::string>());
             return new HostBuffer(py::int_(capacity_bytes).cast<int64_t>(), pinned, alignment_bytes);
           }),
           py::arg("capacity_bytes"), py::arg("pinned"), py::arg("alignment_bytes") = 256)
      .def("reserve", &HostBuffer::reserve, py::arg("capacity_bytes"),
           "Grow to hold capacity_bytes in one buffer (a new allocation only when it does not fit).")
      .def("acquire", &HostBuffer::acquire, py::arg("nbytes"),
           "An aligned uint8 slice of nbytes; grows (a counted allocation) only when it does not fit.")
      .def("reset", &HostBuffer::reset, "Hand out slices from offset 0 again.")
      .def("release", &HostBuffer::release, "Free the buffer; any later use raises.")
      .def_property_readonly("capacity_bytes", &HostBuffer::capacity_bytes)
      .def_property_readonly("used_bytes", &HostBuffer::used_bytes)
      .def_property_readonly("peak_bytes", &HostBuffer::peak_bytes)
      .def_property_readonly("allocations", &HostBuffer::allocations)
      .def_property_readonly("alignment_bytes", &HostBuffer::alignment_bytes)
      .def_property_readonly("pinned", &HostBuffer::pinned)
      .def_property_readonly("released", &HostBuffer::released)
      .def("__repr__", &HostBuffer::repr);
}

}  // namespace badam
