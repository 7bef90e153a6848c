// megamed._C: the Python module plus the `megamed::` op schemas.
//
// The ops go through the torch dispatcher (torch.ops.megamed.*), not through pybind11, so the
// module itself only reports what it was built against; megamed/_ext.py reads these two
// attributes to refuse a stale build instead of crashing on undefined symbols later.
// Kernels: CPU in patch_cpu.cpp, CUDA in cuda/patch_cuda.cpp (compiled only with CUDA torch).
// Autograd and fake (meta) implementations are registered from Python: megamed/ops/_cpp.py.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#ifndef MEGAMED_TORCH_VERSION
#error "MEGAMED_TORCH_VERSION must be defined by the build (CMakeLists.txt passes torch.__version__)"
#endif

// The one TORCH_LIBRARY for the namespace; Python-side custom ops use TORCH_LIBRARY_FRAGMENT
// semantics (torch.library.custom_op / define) with other names.
TORCH_LIBRARY(megamed, m) {
  // Tells torch where the fake/autograd registrations live, so a missing import gives a clear error.
  m.set_python_module("megamed.ops._cpp");
  m.def("patch_merge(Tensor x, Tensor weight, Tensor? bias, int factor) -> Tensor");
  m.def("patch_split(Tensor x, Tensor weight, Tensor? bias, int factor, Tensor? skip, Tensor? lerp) -> Tensor");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "megamed compiled kernels; ops are torch.ops.megamed.patch_merge / patch_split";
  m.attr("torch_version") = MEGAMED_TORCH_VERSION;
  m.attr("with_cuda") = pybind11::bool_(MEGAMED_WITH_CUDA);
}
