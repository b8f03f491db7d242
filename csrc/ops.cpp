// The Python module minigpt._C. Importing it registers the CPU (cpu/) and, when built, CUDA (cuda/) kernels of the
// minigpt op namespace; the schemas and fake (shape-only) implementations are defined once, in minigpt/ops.py.
#include <Python.h>

#ifdef WITH_CUDA
#define MINIGPT_WITH_CUDA 1
#else
#define MINIGPT_WITH_CUDA 0
#endif

// WITH_CUDA says whether the CUDA kernels were compiled in.
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
