// Minimal Python module earlyexit._C so that importing it runs the op registrations of this folder.
// Branch-local stand-in: the extension branch's torch_bindings.cpp defines the real PyInit__C (with
// cuda_archs); when the two meet, this file is deleted.
#include <Python.h>

static PyModuleDef ee_module = {PyModuleDef_HEAD_INIT, "_C", "earlyexit compiled kernels (ops in torch.ops.earlyexit_C)",
                                -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&ee_module); }
