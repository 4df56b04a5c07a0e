// The `deferfs` Python module (CPython C API) over libdeferfs (client.h):
//   deferfs.view(path)      -> View: read-only buffer protocol (memoryview,
//                              numpy.frombuffer work without a copy), len(),
//                              read(off, n) -> bytes (OSError instead of SIGBUS),
//                              refresh(), size, path
//   deferfs.status(*paths), deferfs.sync(*paths, force=False),
//   deferfs.discard(*paths), deferfs.stats(path=".") -> dict of spec 2.1 fields
// Errors raise OSError(errno, message, path).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cerrno>
#include <memory>
#include <string>
#include <vector>

#include "deferfs/client.h"

namespace {

PyObject* raise(const deferfs::ClientError& e, const std::string& path) {
  PyObject* args = Py_BuildValue("(iss)", e.err() ? e.err() : EIO, e.what(), path.c_str());
  if (args) {
    PyErr_SetObject(PyExc_OSError, args);
    Py_DECREF(args);
  }
  return nullptr;
}

// ---- View -------------------------------------------------------------------

struct PyView {
  PyObject_HEAD
  deferfs::View* view;
  Py_ssize_t exports;  // buffers handed out: refresh() must not move the mapping under them
};

void view_dealloc(PyView* self) {
  delete self->view;
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

int view_getbuffer(PyView* self, Py_buffer* buf, int flags) {
  if (flags & PyBUF_WRITABLE) {
    PyErr_SetString(PyExc_BufferError, "a deferfs view is read-only");
    buf->obj = nullptr;
    return -1;
  }
  auto* data = const_cast<std::byte*>(self->view->data());
  if (PyBuffer_FillInfo(buf, reinterpret_cast<PyObject*>(self), data,
                        static_cast<Py_ssize_t>(self->view->size()), 1, flags) < 0)
    return -1;
  ++self->exports;
  return 0;
}

void view_releasebuffer(PyView* self, Py_buffer*) { --self->exports; }

PyBufferProcs view_as_buffer = {reinterpret_cast<getbufferproc>(view_getbuffer),
                                reinterpret_cast<releasebufferproc>(view_releasebuffer)};

Py_ssize_t view_len(PyView* self) { return static_cast<Py_ssize_t>(self->view->size()); }

PySequenceMethods view_as_sequence = {reinterpret_cast<lenfunc>(view_len)};

PyObject* view_read(PyView* self, PyObject* args) {
  unsigned long long off = 0;
  Py_ssize_t n = 0;
  if (!PyArg_ParseTuple(args, "Kn:read", &off, &n)) return nullptr;
  if (n < 0) {
    PyErr_SetString(PyExc_ValueError, "read: negative length");
    return nullptr;
  }
  const uint64_t size = self->view->size();
  if (off >= size) return PyBytes_FromStringAndSize(nullptr, 0);
  if (static_cast<uint64_t>(n) > size - off) n = static_cast<Py_ssize_t>(size - off);
  PyObject* out = PyBytes_FromStringAndSize(nullptr, n);
  if (!out) return nullptr;
  ssize_t got;
  Py_BEGIN_ALLOW_THREADS
  got = self->view->read(off, static_cast<size_t>(n), PyBytes_AS_STRING(out));
  Py_END_ALLOW_THREADS
  if (got < 0) {
    Py_DECREF(out);
    errno = static_cast<int>(-got);
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, self->view->path().c_str());
  }
  if (got < n && _PyBytes_Resize(&out, got) < 0) return nullptr;
  return out;
}

PyObject* view_refresh(PyView* self, PyObject*) {
  if (self->exports > 0) {
    PyErr_SetString(PyExc_BufferError, "refresh: buffers of this view are still in use (release them first)");
    return nullptr;
  }
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = self->view->refresh();
  Py_END_ALLOW_THREADS
  if (rc < 0) {
    errno = -rc;
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, self->view->path().c_str());
  }
  Py_RETURN_NONE;
}

PyObject* view_size(PyView* self, void*) { return PyLong_FromUnsignedLongLong(self->view->size()); }
PyObject* view_path(PyView* self, void*) { return PyUnicode_DecodeFSDefault(self->view->path().c_str()); }

PyMethodDef view_methods[] = {
    {"read", reinterpret_cast<PyCFunction>(view_read), METH_VARARGS,
     "read(off, n) -> bytes: up to n bytes at off; OSError (EIO) where the view would raise SIGBUS"},
    {"refresh", reinterpret_cast<PyCFunction>(view_refresh), METH_NOARGS,
     "refresh(): follow a size change of the file (no buffer of the view may be in use)"},
    {nullptr, nullptr, 0, nullptr}};

PyGetSetDef view_getset[] = {{"size", reinterpret_cast<getter>(view_size), nullptr, "the file's size", nullptr},
                             {"path", reinterpret_cast<getter>(view_path), nullptr, "the path opened", nullptr},
                             {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyTypeObject view_type = [] {
  PyTypeObject t{PyVarObject_HEAD_INIT(nullptr, 0)};
  t.tp_name = "deferfs.View";
  t.tp_basicsize = sizeof(PyView);
  t.tp_dealloc = reinterpret_cast<destructor>(view_dealloc);
  t.tp_as_sequence = &view_as_sequence;
  t.tp_as_buffer = &view_as_buffer;
  t.tp_flags = Py_TPFLAGS_DEFAULT;
  t.tp_doc = "A read-only view of a file on a deferfs mount (deferfs.view(path)).";
  t.tp_methods = view_methods;
  t.tp_getset = view_getset;
  return t;
}();

PyObject* py_view(PyObject*, PyObject* args) {
  PyObject* path_obj = nullptr;
  if (!PyArg_ParseTuple(args, "O&:view", PyUnicode_FSConverter, &path_obj)) return nullptr;
  const std::string path = PyBytes_AS_STRING(path_obj);
  Py_DECREF(path_obj);
  std::unique_ptr<deferfs::View> v;
  std::unique_ptr<deferfs::ClientError> error;
  Py_BEGIN_ALLOW_THREADS
  try {
    v = std::make_unique<deferfs::View>(deferfs::View::open(path));
  } catch (const deferfs::ClientError& e) {
    error = std::make_unique<deferfs::ClientError>(e);
  } catch (const std::exception& e) {
    error = std::make_unique<deferfs::ClientError>(1, path + ": " + e.what(), EIO);
  }
  Py_END_ALLOW_THREADS
  if (error) return raise(*error, path);
  PyView* self = PyObject_New(PyView, &view_type);
  if (!self) return nullptr;
  self->view = v.release();
  self->exports = 0;
  return reinterpret_cast<PyObject*>(self);
}

// ---- Control operations -------------------------------------------------------

// The paths of *args (str or bytes or PathLike), or "." when none.
bool paths_of(PyObject* args, std::vector<std::string>& out) {
  const Py_ssize_t n = PyTuple_GET_SIZE(args);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* b = nullptr;
    if (!PyUnicode_FSConverter(PyTuple_GET_ITEM(args, i), &b)) return false;
    out.emplace_back(PyBytes_AS_STRING(b));
    Py_DECREF(b);
  }
  if (out.empty()) out.emplace_back(".");
  return true;
}

// The report as a dict (through the json module: the wire is JSON already).
PyObject* to_dict(const nlohmann::json& result) {
  PyObject* json_mod = PyImport_ImportModule("json");
  if (!json_mod) return nullptr;
  const std::string text = result.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  PyObject* out = PyObject_CallMethod(json_mod, "loads", "s#", text.data(), static_cast<Py_ssize_t>(text.size()));
  Py_DECREF(json_mod);
  return out;
}

template <typename Fn>
PyObject* run(const std::vector<std::string>& paths, Fn fn) {
  deferfs::ControlResult r;
  std::unique_ptr<deferfs::ClientError> error;
  Py_BEGIN_ALLOW_THREADS
  try {
    r = fn();
  } catch (const deferfs::ClientError& e) {
    error = std::make_unique<deferfs::ClientError>(e);
  } catch (const std::exception& e) {
    error = std::make_unique<deferfs::ClientError>(1, e.what(), EIO);
  }
  Py_END_ALLOW_THREADS
  if (error) return raise(*error, paths.front());
  // A sync or discard that left some files staged still returns its
  // report: its "conflicts" and "failed" say which.
  return to_dict(r.result());
}

PyObject* py_status(PyObject*, PyObject* args) {
  std::vector<std::string> paths;
  if (!paths_of(args, paths)) return nullptr;
  return run(paths, [&] { return deferfs::status(paths); });
}

PyObject* py_discard(PyObject*, PyObject* args) {
  std::vector<std::string> paths;
  if (!paths_of(args, paths)) return nullptr;
  return run(paths, [&] { return deferfs::discard(paths); });
}

PyObject* py_sync(PyObject*, PyObject* args, PyObject* kwargs) {
  int force = 0;
  if (kwargs) {
    PyObject* f = PyDict_GetItemString(kwargs, "force");
    if (PyDict_Size(kwargs) != (f ? 1 : 0)) {
      PyErr_SetString(PyExc_TypeError, "sync() takes only the keyword argument 'force'");
      return nullptr;
    }
    if (f && (force = PyObject_IsTrue(f)) < 0) return nullptr;
  }
  std::vector<std::string> paths;
  if (!paths_of(args, paths)) return nullptr;
  return run(paths, [&] { return deferfs::sync(paths, force != 0); });
}

PyObject* py_stats(PyObject*, PyObject* args) {
  std::vector<std::string> paths;
  if (!paths_of(args, paths)) return nullptr;
  if (paths.size() != 1) {
    PyErr_SetString(PyExc_TypeError, "stats() takes at most one path");
    return nullptr;
  }
  return run(paths, [&] { return deferfs::stats(paths.front()); });
}

PyMethodDef module_methods[] = {
    {"view", py_view, METH_VARARGS, "view(path) -> View: a read-only view of a file on a deferfs mount"},
    {"status", py_status, METH_VARARGS, "status(*paths) -> dict: what is staged (spec 2.1)"},
    {"sync", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_sync)), METH_VARARGS | METH_KEYWORDS,
     "sync(*paths, force=False) -> dict: commit staged changes (spec 2.1)"},
    {"discard", py_discard, METH_VARARGS, "discard(*paths) -> dict: drop staged changes"},
    {"stats", py_stats, METH_VARARGS, "stats(path='.') -> dict: the mount's counters (spec 2.1)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "deferfs",
                          "deferfs client: views and control operations of a deferfs mount", -1,
                          module_methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit_deferfs() {
  if (PyType_Ready(&view_type) < 0) return nullptr;
  PyObject* m = PyModule_Create(&module_def);
  if (!m) return nullptr;
  Py_INCREF(&view_type);
  if (PyModule_AddObject(m, "View", reinterpret_cast<PyObject*>(&view_type)) < 0) {
    Py_DECREF(&view_type);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
