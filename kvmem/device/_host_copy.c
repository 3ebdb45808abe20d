/* kvmem.device._host_copy: streaming copies between host memory and the host device's pages.

Design note
-----------
An offloading sleep copies a model's pages to host memory and its wake copies them back, one
2 MiB page per call, on the daemon's copy threads (kvmemd.host_tier, kvmem.device.host). glibc's
memcpy writes with non-temporal stores only above a size threshold (its tunable
glibc.cpu.x86_non_temporal_threshold, derived from the shared cache's size: 181.5 MiB on the Xeon
an earlier benchmark ran on), so a page-sized memcpy reads every destination line into the
cache before it overwrites it (read for ownership) and evicts other work's lines to hold data
nobody reads soon: half again the memory traffic the copy needs. A 1 GiB memcpy, the
baseline bench_sleep compares against, streams. `stream` gives page copies the same: 16-byte
non-temporal stores (SSE2, present on every x86-64 CPU) over the 16-byte-aligned body of the
destination, ordinary copies for its head and tail, then one store fence, so that every byte is
visible to other threads and processes before the call returns (non-temporal stores are weakly
ordered: the fence is what lets the daemon tell an engine its pages are restored right after).
Elsewhere (other architectures, copies under 4 KiB) it is memcpy.

Contract: the ranges are valid, do not overlap, and belong to the caller (kvmem.device checks
every range under its lock before it copies; this module trusts its caller as ctypes.memmove
does). The GIL is released during the copy.
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define KVMEM_STREAM_STORES 1
#endif

/* Below this, the fence and the alignment work cost more than the cache pollution saved. */
#define STREAM_MIN_BYTES 4096

static void stream_copy(char *dst, const char *src, size_t n) {
#ifdef KVMEM_STREAM_STORES
    if (n >= STREAM_MIN_BYTES) {
        size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
        memcpy(dst, src, head);
        dst += head;
        src += head;
        n -= head;
        /* Invariant: dst is 16-byte aligned (stream stores need it); src may not be. */
        for (; n >= 64; n -= 64, dst += 64, src += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)src);
            __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
            _mm_stream_si128((__m128i *)dst, a);
            _mm_stream_si128((__m128i *)(dst + 16), b);
            _mm_stream_si128((__m128i *)(dst + 32), c);
            _mm_stream_si128((__m128i *)(dst + 48), d);
        }
        _mm_sfence();
    }
#endif
    memcpy(dst, src, n);
}

static PyObject *host_copy_stream(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "stream(dst, src, size) takes 3 arguments, not %zd", nargs);
        return NULL;
    }
    uintptr_t addresses[2];
    for (int i = 0; i < 2; i++) {
        /* Addresses are Python ints as ctypes gives them: checked to fit a pointer. */
        unsigned long long value = PyLong_AsUnsignedLongLong(args[i]);
        if (value == (unsigned long long)-1 && PyErr_Occurred()) {
            return NULL;
        }
        if (value > UINTPTR_MAX || value == 0) {
            PyErr_Format(PyExc_ValueError, "stream: %s address %llu is not a valid pointer", i ? "src" : "dst", value);
            return NULL;
        }
        addresses[i] = (uintptr_t)value;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[2]);
    if (size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (size < 0) {
        PyErr_Format(PyExc_ValueError, "stream: size %zd is negative", size);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    stream_copy((char *)addresses[0], (const char *)addresses[1], (size_t)size);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef host_copy_methods[] = {
    {"stream", (PyCFunction)(void (*)(void))host_copy_stream, METH_FASTCALL,
     "stream(dst, src, size): copy size bytes from address src to address dst with non-temporal\n"
     "stores where the CPU has them (see the module's design note); the ranges must not overlap."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef host_copy_module = {
    PyModuleDef_HEAD_INIT, "kvmem.device._host_copy", "Streaming copies for page-sized host copies (design note in the C file).",
    0, host_copy_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__host_copy(void) { return PyModuleDef_Init(&host_copy_module); }
