// The minigpt op namespace: schemas (mirroring minigpt/reference.py), shape-only Meta kernels (used by
// FakeTensor / torch.compile / opcheck) and the Python module minigpt._C. Device kernels: cpu/, cuda/.
#include <Python.h>
#include <torch/library.h>

#include <ATen/ATen.h>

#include <optional>

namespace minigpt {
namespace {

at::Tensor act_stats_meta(const at::Tensor& gate, const std::optional<at::Tensor>&, c10::string_view, at::Tensor&,
                          at::Tensor&) {
  return at::empty_symint(gate.sym_sizes(), gate.options());
}

void column_stats_meta(const at::Tensor&, at::Tensor&, at::Tensor&) {}

void token_histogram_meta(const at::Tensor&, const std::optional<at::Tensor>&, at::Tensor&) {}

std::vector<at::Tensor> gather_meta(at::TensorList srcs, at::TensorList indices, at::IntArrayRef dims) {
  TORCH_CHECK(srcs.size() == indices.size() && srcs.size() == dims.size(),
              "minigpt: gather needs as many indices and dims as sources");
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < srcs.size(); ++i) {
    TORCH_CHECK(srcs[i].dim() == 2 && (dims[i] == 0 || dims[i] == 1), "minigpt: gather takes 2-D sources, dim 0 or 1");
    std::vector<c10::SymInt> sizes(srcs[i].sym_sizes().begin(), srcs[i].sym_sizes().end());
    sizes[dims[i]] = indices[i].sym_numel();
    outs.push_back(at::empty_symint(sizes, srcs[i].options()));
  }
  return outs;
}

}  // namespace

TORCH_LIBRARY(minigpt, m) {
  m.def("act_stats(Tensor gate, Tensor? up, str act, Tensor(a!) acc, Tensor(b!) nnz) -> Tensor");
  m.def("column_stats(Tensor x, Tensor(a!) acc, Tensor(b!) nnz) -> ()");
  m.def("token_histogram(Tensor ids, Tensor? mask, Tensor(a!) counts) -> ()");
  m.def("gather(Tensor[] srcs, Tensor[] indices, int[] dims) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(minigpt, Meta, m) {
  m.impl("act_stats", &act_stats_meta);
  m.impl("column_stats", &column_stats_meta);
  m.impl("token_histogram", &token_histogram_meta);
  m.impl("gather", &gather_meta);
}

}  // namespace minigpt

#ifdef WITH_CUDA
#define MINIGPT_WITH_CUDA 1
#else
#define MINIGPT_WITH_CUDA 0
#endif

// import minigpt._C registers the ops above; WITH_CUDA says whether the CUDA kernels were compiled in.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "minigpt._C", "minigpt C++/CUDA kernels (torch.ops.minigpt)",
                               -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddObject(m, "WITH_CUDA", PyBool_FromLong(MINIGPT_WITH_CUDA)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
