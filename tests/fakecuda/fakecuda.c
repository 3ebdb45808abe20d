/*
 * fakecuda: a contract-enforcing fake of the CUDA driver's virtual-memory API, built as a shared
 * library with the SONAME libcuda.so.1 so that cuda-bindings (and so kvmem.device.CudaDevice) runs
 * its real code path on a machine without a GPU.
 *
 * Design
 * ------
 * "Device memory" is host memory:
 *   - a VA reservation is an anonymous PROT_NONE mapping (MAP_NORESERVE),
 *   - a physical allocation is a memfd named "fakecuda-page" whose memory is allocated at
 *     cuMemCreate, as the driver's is (a shortage is OUT_OF_MEMORY there, not a fault later),
 *   - cuMemMap maps the memfd MAP_SHARED|MAP_FIXED at the address, still PROT_NONE,
 *   - cuMemSetAccess mprotects the range (so touching a mapping before it faults, as on a GPU),
 *   - cuMemUnmap puts the PROT_NONE reservation back,
 *   - export/import of a POSIX file descriptor is dup() of the memfd, so an exported page can be
 *     imported in another process and both see the same bytes.
 *
 * Contract enforced (each one returns the error the driver documents, never "works anyway"):
 *   - cuInit before anything; a current context for every memory call (cuCtxSetCurrent);
 *   - sizes, addresses and alignments multiple of the allocation granularity;
 *   - cuMemMap only inside one reservation, offset 0, flags 0; overlapping -> ALREADY_MAPPED;
 *   - cuMemUnmap covers whole mappings only (cuMemUnmap cannot unmap a sub-range: CUDA driver API
 *     reference, cuMemUnmap);
 *   - cuMemSetAccess only on mapped ranges; before it, any access faults;
 *   - cuMemCreate beyond FAKECUDA_CAPACITY_BYTES -> OUT_OF_MEMORY (the fake stays usable);
 *   - cuMemRelease of a mapped allocation keeps its memory until the last unmap;
 *   - cuMemExportToShareableHandle only for handle types requested at creation;
 *   - memset/memcpy on a device range that is unmapped or lacks access -> ILLEGAL_ADDRESS, which
 *     is sticky for the process as on a GPU (the context is unusable afterwards); on a range outside
 *     every reservation -> INVALID_VALUE.
 * Stricter than the driver, on purpose:
 *   - cuGetProcAddress_v2 resolves only the exact (name, version) pairs in its table. The bindings
 *     always ask for the version in which a variant was introduced, so an exact match is what they
 *     need; anything else is an ABI variant this fake does not implement and gets NOT_FOUND rather
 *     than a wrong variant.
 *   - cuMemAddressFree of a reservation that still has mappings -> INVALID_VALUE.
 * Capacity is accounted per process: only cuMemCreate charges it (an imported allocation is memory
 * that already exists). In kvmem only the daemon creates pages, so this matches the real device.
 *
 * Observability for tests and benchmarks: a counter per entry point and gauges of live objects,
 * read in-process through fakecuda_counter()/fakecuda_live(), or from another process when
 * FAKECUDA_COUNTERS_FILE names a file: the counters then live in that file (layout in
 * counters.py). Every cuGetProcAddress lookup is recorded (fakecuda_lookup_*).
 *
 * Environment (read at cuInit): FAKECUDA_CAPACITY_BYTES (default 4 GiB), FAKECUDA_GRANULARITY
 * (default 2 MiB), FAKECUDA_DEVICE_COUNT (default 1), FAKECUDA_VMM_SUPPORTED (default 1),
 * FAKECUDA_DRIVER_VERSION (default 13000), FAKECUDA_COUNTERS_FILE, and three faults to inject:
 * FAKECUDA_FAIL_COPY_AT=N makes the N-th host<->device copy of the process (cuMemcpyHtoD or
 * cuMemcpyDtoH, counted from 1) fail with CUDA_ERROR_UNKNOWN, once and not sticky, so that tests
 * can break a sleep's or a wake's copies half-way (default 0: never); FAKECUDA_PINNED_LIMIT_BYTES=N
 * makes cuMemHostAlloc fail with CUDA_ERROR_OUT_OF_MEMORY when the page-locked memory it has
 * handed out and not had freed would exceed N bytes, as a real one does when the host cannot
 * pin more (default 0: no limit); FAKECUDA_HOST_ALLOC_GATE=PATH makes every cuMemHostAlloc wait
 * until the file PATH exists (pinning is slow: tests hold it to see who waits for it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE /* Linux 5.14; older C libraries lack the name */
#define MADV_POPULATE_WRITE 23
#endif


/* ---- the subset of cuda.h this fake needs (values from cuda.h; layouts checked against the
 * structs cuda-bindings 13.x passes: CUmemLocation is 8 bytes, CUmemAccessDesc.flags at 8,
 * CUmemAllocationProp is 32 bytes) ---- */
typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct fake_context *CUcontext;
typedef struct {
    char bytes[16];
} CUuuid;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_ALREADY_MAPPED = 208,
    CUDA_ERROR_NOT_MAPPED = 211,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_UNKNOWN = 999,
};

enum { CU_MEM_ALLOCATION_TYPE_PINNED = 1 };
enum { CU_MEM_LOCATION_TYPE_DEVICE = 1 };
enum { CU_MEM_HANDLE_TYPE_NONE = 0, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1 };
enum {
    CU_MEM_ACCESS_FLAGS_PROT_NONE = 0,
    CU_MEM_ACCESS_FLAGS_PROT_READ = 1,
    CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3,
};
enum { CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1 };
enum {
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75,
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76,
    CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102,
    CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 103,
};
enum {
    CU_GET_PROC_ADDRESS_SUCCESS = 0,
    CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND = 1,
    CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT = 2,
};

typedef struct {
    int type;
    int id;
} CUmemLocation;

typedef struct {
    int type;
    int requestedHandleTypes;
    CUmemLocation location;
    void *win32HandleMetaData;
    unsigned char allocFlags[8];
} CUmemAllocationProp;

typedef struct {
    CUmemLocation location;
    int flags;
} CUmemAccessDesc;

_Static_assert(sizeof(CUmemAllocationProp) == 32, "CUmemAllocationProp layout");
_Static_assert(sizeof(CUmemAccessDesc) == 12, "CUmemAccessDesc layout");

/* ---- configuration ---- */
static size_t g_granularity = 2u << 20;
static size_t g_capacity = 4ull << 30;
static int g_device_count = 1;   /* devices this process sees (after CUDA_VISIBLE_DEVICES) */
/* The physical device behind each visible ordinal: the driver renumbers the devices that
   CUDA_VISIBLE_DEVICES names from 0, in the order named; a device's name and UUID stay its own. */
static int g_physical[64];
static int g_vmm_supported = 1;
static int g_driver_version = 13000;
static unsigned long long g_fail_copy_at; /* FAKECUDA_FAIL_COPY_AT; 0: no injected failure */
static size_t g_pinned_limit;             /* FAKECUDA_PINNED_LIMIT_BYTES; 0: no limit */
static size_t g_pinned_bytes;             /* page-locked bytes handed out and not freed (g_lock) */
static char *g_host_alloc_gate;           /* FAKECUDA_HOST_ALLOC_GATE; NULL: none */
static unsigned long long g_copies;        /* host<->device copies so far (under g_lock) */

/* ---- state; one lock guards all of it ---- */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_initialized;
static CUresult g_sticky_error; /* set by an illegal access; every later context call fails */

struct fake_context {
    int device;
    int retain_count;
};
static struct fake_context *g_primary;  /* one per device, array of g_device_count */
static __thread CUcontext t_current;

struct physical {
    int memfd;
    size_t size;
    int handle_types;
    int refs;    /* 1 for the live handle + 1 per mapping */
    int charged; /* created here (counts against capacity) rather than imported */
};
static size_t g_charged_bytes;

/* Handles are 1-based indexes into g_handles; a released handle's slot stays NULL so a stale
 * handle is INVALID_HANDLE rather than someone else's memory. */
static struct physical **g_handles;
static size_t g_handles_len, g_handles_cap;

struct mapping {
    size_t offset; /* from the reservation base */
    size_t size;
    struct physical *phys;
    int access; /* CU_MEM_ACCESS_FLAGS_* */
};
struct reservation {
    uintptr_t base;
    size_t size;
    struct mapping *maps; /* sorted by offset, non-overlapping */
    size_t nmaps, capmaps;
};
static struct reservation *g_res;
static size_t g_nres, g_capres;

/* ---- counters ---- */
#define NAME_LEN 56
struct counter_entry {
    char name[NAME_LEN];
    uint64_t value;
};
struct counter_file {
    char magic[8]; /* "FAKECUDA" */
    uint32_t version;
    uint32_t count;
    struct counter_entry entries[];
};
enum counter_id {
#define ENTRY(sym) C_##sym,
#include "fakecuda_entries.h"
#undef ENTRY
    C_LIVE_RESERVATIONS,
    C_LIVE_HANDLES,
    C_LIVE_ALLOCATIONS,
    C_LIVE_MAPPINGS,
    C_CHARGED_BYTES,
    C_LIVE_HOST_ALLOCATIONS,
    C_COUNT
};
static const char *const k_counter_names[C_COUNT] = {
#define ENTRY(sym) #sym,
#include "fakecuda_entries.h"
#undef ENTRY
    "live.reservations", "live.handles", "live.allocations", "live.mappings", "live.charged_bytes",
    "live.host_allocations",
};
static struct counter_file *g_counters;

static void counters_setup(void) {
    size_t bytes = sizeof(struct counter_file) + C_COUNT * sizeof(struct counter_entry);
    const char *path = getenv("FAKECUDA_COUNTERS_FILE");
    void *mem = MAP_FAILED;
    if (path && *path) {
        int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd >= 0 && ftruncate(fd, (off_t)bytes) == 0)
            mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (fd >= 0) close(fd);
    }
    if (mem == MAP_FAILED)
        mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return;
    struct counter_file *c = mem;
    for (int i = 0; i < C_COUNT; i++) {
        strncpy(c->entries[i].name, k_counter_names[i], NAME_LEN - 1);
        c->entries[i].value = 0;
    }
    c->version = 1;
    c->count = C_COUNT;
    memcpy(c->magic, "FAKECUDA", 8); /* last: a reader that sees the magic sees the names */
    g_counters = c;
}
static pthread_once_t g_counters_once = PTHREAD_ONCE_INIT;

static void count(enum counter_id id) {
    pthread_once(&g_counters_once, counters_setup);
    if (g_counters) __atomic_fetch_add(&g_counters->entries[id].value, 1, __ATOMIC_RELAXED);
}
static void gauge_add(enum counter_id id, int64_t delta) {
    pthread_once(&g_counters_once, counters_setup);
    if (g_counters) __atomic_fetch_add(&g_counters->entries[id].value, (uint64_t)delta, __ATOMIC_RELAXED);
}

/* ---- helpers ---- */
static int aligned(uint64_t v) { return v % g_granularity == 0; }

static size_t env_size(const char *name, size_t fallback) {
    const char *s = getenv(name);
    if (!s || !*s) return fallback;
    char *end = NULL;
    unsigned long long v = strtoull(s, &end, 10);
    return (end && *end == '\0' && v > 0) ? (size_t)v : fallback;
}

/* Every memory entry point: initialized, a live current context, no sticky error. */
static CUresult require_context(void) {
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (t_current == NULL || t_current->retain_count <= 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (g_sticky_error) return g_sticky_error;
    return CUDA_SUCCESS;
}

static struct reservation *find_reservation(uintptr_t addr) {
    for (size_t i = 0; i < g_nres; i++)
        if (addr >= g_res[i].base && addr < g_res[i].base + g_res[i].size) return &g_res[i];
    return NULL;
}

static struct physical *handle_get(CUmemGenericAllocationHandle h) {
    if (h == 0 || h > g_handles_len) return NULL;
    return g_handles[h - 1];
}

static CUmemGenericAllocationHandle handle_add(struct physical *p) {
    if (g_handles_len == g_handles_cap) {
        size_t cap = g_handles_cap ? g_handles_cap * 2 : 256;
        struct physical **n = realloc(g_handles, cap * sizeof *n);
        if (!n) return 0;
        g_handles = n;
        g_handles_cap = cap;
    }
    g_handles[g_handles_len++] = p;
    gauge_add(C_LIVE_HANDLES, 1);
    return g_handles_len;
}

static void physical_unref(struct physical *p) {
    if (--p->refs > 0) return;
    close(p->memfd);
    if (p->charged) {
        g_charged_bytes -= p->size;
        gauge_add(C_CHARGED_BYTES, -(int64_t)p->size);
    }
    gauge_add(C_LIVE_ALLOCATIONS, -1);
    free(p);
}

/* Check that [addr, addr+n) lies in mapped ranges of one reservation with at least `need`
 * access. Outside every reservation: INVALID_VALUE (not device memory). Inside but unmapped or
 * without access: ILLEGAL_ADDRESS, made sticky as a GPU fault is. */
static CUresult check_device_range(CUdeviceptr addr, size_t n, int need) {
    if (n == 0) return CUDA_SUCCESS;
    struct reservation *r = find_reservation((uintptr_t)addr);
    if (!r) return CUDA_ERROR_INVALID_VALUE;
    size_t off = (size_t)(addr - r->base), end = off + n;
    if (end > r->size || end < off) {
        g_sticky_error = CUDA_ERROR_ILLEGAL_ADDRESS;
        return g_sticky_error;
    }
    size_t cursor = off;
    for (size_t i = 0; i < r->nmaps && cursor < end; i++) {
        struct mapping *m = &r->maps[i];
        if (m->offset + m->size <= cursor) continue;
        if (m->offset > cursor || (m->access & need) != need) break;
        cursor = m->offset + m->size;
    }
    if (cursor < end) {
        g_sticky_error = CUDA_ERROR_ILLEGAL_ADDRESS;
        return g_sticky_error;
    }
    return CUDA_SUCCESS;
}

/* ======================= entry points ======================= */

static CUresult fake_cuGetErrorName(CUresult error, const char **out);
static CUresult fake_cuGetErrorString(CUresult error, const char **out);

static CUresult fake_cuInit(unsigned int flags) {
    count(C_cuInit);
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    if (!g_initialized) {
        g_granularity = env_size("FAKECUDA_GRANULARITY", 2u << 20);
        if (g_granularity % 4096 != 0) g_granularity = 2u << 20;
        g_capacity = env_size("FAKECUDA_CAPACITY_BYTES", 4ull << 30);
        int physical = (int)env_size("FAKECUDA_DEVICE_COUNT", 1);
        if (physical > 64) physical = 64;
        g_device_count = 0;
        const char *visible = getenv("CUDA_VISIBLE_DEVICES");
        if (visible == NULL) {
            for (int i = 0; i < physical; i++) g_physical[g_device_count++] = i;
        } else {
            /* Integer indices, comma-separated; like the driver, stop at the first invalid entry. */
            const char *p = visible;
            while (*p && g_device_count < 64) {
                char *end = NULL;
                long v = strtol(p, &end, 10);
                if (end == p || v < 0 || v >= physical) break;
                g_physical[g_device_count++] = (int)v;
                p = (*end == ',') ? end + 1 : end;
                if (*end != ',') break;
            }
        }
        const char *vmm = getenv("FAKECUDA_VMM_SUPPORTED");
        g_vmm_supported = !(vmm && strcmp(vmm, "0") == 0);
        g_driver_version = (int)env_size("FAKECUDA_DRIVER_VERSION", 13000);
        g_fail_copy_at = env_size("FAKECUDA_FAIL_COPY_AT", 0);
        g_pinned_limit = env_size("FAKECUDA_PINNED_LIMIT_BYTES", 0);
        const char *gate = getenv("FAKECUDA_HOST_ALLOC_GATE");
        g_host_alloc_gate = (gate && *gate) ? strdup(gate) : NULL;
        g_primary = calloc((size_t)(g_device_count ? g_device_count : 1), sizeof *g_primary);
        for (int i = 0; i < g_device_count; i++) g_primary[i].device = i;
        g_initialized = 1;
    }
    int visible = g_device_count;
    pthread_mutex_unlock(&g_lock);
    /* As the driver: with every device hidden (CUDA_VISIBLE_DEVICES="" or naming none), cuInit fails. */
    return visible > 0 ? CUDA_SUCCESS : CUDA_ERROR_NO_DEVICE;
}

static CUresult fake_cuDriverGetVersion(int *version) {
    count(C_cuDriverGetVersion);
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    *version = g_driver_version;
    return CUDA_SUCCESS;
}

static CUresult fake_cuDeviceGetCount(int *n) {
    count(C_cuDeviceGetCount);
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *n = g_device_count;
    return CUDA_SUCCESS;
}

static CUresult fake_cuDeviceGet(CUdevice *dev, int ordinal) {
    count(C_cuDeviceGet);
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!dev) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal < 0 || ordinal >= g_device_count) return CUDA_ERROR_INVALID_DEVICE;
    *dev = ordinal;
    return CUDA_SUCCESS;
}

static CUresult fake_cuDeviceGetName(char *name, int len, CUdevice dev) {
    count(C_cuDeviceGetName);
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (dev < 0 || dev >= g_device_count) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "kvmem fakecuda device %d", g_physical[dev]);
    return CUDA_SUCCESS;
}

/* A device's UUID: 16 bytes, fixed per physical device (fa4ec0da-SSSS-4SSS-8000-0000000000NN, S from
   FAKECUDA_UUID_SEED), whichever ordinal CUDA_VISIBLE_DEVICES gives it. Test sessions that run at the
   same time on one machine give their fakes different seeds, so their daemons hold different GPUs. cuda-bindings 13 asks for the _v2 ABI
   (version 11040, which also names MIG instances); it takes (CUuuid *, CUdevice). */
static CUresult fake_cuDeviceGetUuid(CUuuid *uuid, CUdevice dev) {
    count(C_cuDeviceGetUuid);
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!uuid) return CUDA_ERROR_INVALID_VALUE;
    if (dev < 0 || dev >= g_device_count) return CUDA_ERROR_INVALID_DEVICE;
    static const unsigned char stem[16] = {0xfa, 0x4e, 0xc0, 0xda, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0, 0};
    unsigned long seed = (unsigned long)env_size("FAKECUDA_UUID_SEED", 0) & 0xffffffUL;
    memcpy(uuid->bytes, stem, 16);
    uuid->bytes[4] = (char)(seed >> 16);
    uuid->bytes[5] = (char)(seed >> 8);
    uuid->bytes[7] = (char)seed;
    uuid->bytes[15] = (char)g_physical[dev];
    return CUDA_SUCCESS;
}

static CUresult fake_cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    count(C_cuDeviceTotalMem);
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (dev < 0 || dev >= g_device_count) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = g_capacity;
    return CUDA_SUCCESS;
}

/* Attributes this fake does not model are INVALID_VALUE rather than a made-up number. */
static CUresult fake_cuDeviceGetAttribute(int *value, int attrib, CUdevice dev) {
    count(C_cuDeviceGetAttribute);
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    if (dev < 0 || dev >= g_device_count) return CUDA_ERROR_INVALID_DEVICE;
    switch (attrib) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = 8; return CUDA_SUCCESS;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = 0; return CUDA_SUCCESS;
    case CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: *value = g_vmm_supported; return CUDA_SUCCESS;
    case CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED: *value = g_vmm_supported; return CUDA_SUCCESS;
    default: return CUDA_ERROR_INVALID_VALUE;
    }
}

static CUresult fake_cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev) {
    count(C_cuDevicePrimaryCtxRetain);
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    if (dev < 0 || dev >= g_device_count) return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_lock);
    g_primary[dev].retain_count++;
    *ctx = &g_primary[dev];
    pthread_mutex_unlock(&g_lock);
    return CUDA_SUCCESS;
}

static CUresult fake_cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    count(C_cuDevicePrimaryCtxRelease);
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (dev < 0 || dev >= g_device_count) return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_lock);
    CUresult rc = CUDA_SUCCESS;
    if (g_primary[dev].retain_count <= 0) rc = CUDA_ERROR_INVALID_CONTEXT;
    else g_primary[dev].retain_count--;
    pthread_mutex_unlock(&g_lock);
    return rc;
}

static CUresult fake_cuCtxSetCurrent(CUcontext ctx) {
    count(C_cuCtxSetCurrent);
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (ctx != NULL) {
        int known = 0;
        for (int i = 0; i < g_device_count; i++) known |= (ctx == &g_primary[i]);
        if (!known || ctx->retain_count <= 0) return CUDA_ERROR_INVALID_CONTEXT;
    }
    t_current = ctx;
    return CUDA_SUCCESS;
}

static CUresult fake_cuCtxGetCurrent(CUcontext *ctx) {
    count(C_cuCtxGetCurrent);
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    *ctx = t_current;
    return CUDA_SUCCESS;
}

/* All fake work is synchronous, so synchronizing only reports a sticky error. */
static CUresult fake_cuCtxSynchronize(void) {
    count(C_cuCtxSynchronize);
    return require_context();
}

/* The CUDA 13 variant that names the context to synchronize. */
static CUresult fake_cuCtxSynchronize_v2(CUcontext ctx) {
    count(C_cuCtxSynchronize);
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (ctx == NULL) return require_context();
    if (ctx->retain_count <= 0) return CUDA_ERROR_INVALID_CONTEXT;
    return g_sticky_error;
}

static CUresult fake_cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes) {
    count(C_cuMemGetInfo);
    CUresult rc = require_context();
    if (rc) return rc;
    if (!free_bytes || !total_bytes) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    *total_bytes = g_capacity;
    *free_bytes = g_capacity - g_charged_bytes;
    pthread_mutex_unlock(&g_lock);
    return CUDA_SUCCESS;
}

static CUresult check_prop(const CUmemAllocationProp *prop) {
    if (!prop) return CUDA_ERROR_INVALID_VALUE;
    if (prop->type != CU_MEM_ALLOCATION_TYPE_PINNED) return CUDA_ERROR_INVALID_VALUE;
    if (prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE) return CUDA_ERROR_INVALID_VALUE;
    if (prop->location.id < 0 || prop->location.id >= g_device_count) return CUDA_ERROR_INVALID_DEVICE;
    if (prop->requestedHandleTypes & ~CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) return CUDA_ERROR_NOT_SUPPORTED;
    if (!g_vmm_supported) return CUDA_ERROR_NOT_SUPPORTED;
    return CUDA_SUCCESS;
}

static CUresult fake_cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop, int option) {
    count(C_cuMemGetAllocationGranularity);
    CUresult rc = require_context();
    if (rc) return rc;
    if (!granularity) return CUDA_ERROR_INVALID_VALUE;
    if (option != CU_MEM_ALLOC_GRANULARITY_MINIMUM && option != CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)
        return CUDA_ERROR_INVALID_VALUE;
    if ((rc = check_prop(prop))) return rc;
    *granularity = g_granularity;
    return CUDA_SUCCESS;
}

static CUresult fake_cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr, unsigned long long flags) {
    (void)addr; /* a hint only, as for the driver */
    count(C_cuMemAddressReserve);
    CUresult rc = require_context();
    if (rc) return rc;
    if (!ptr || size == 0 || !aligned(size) || flags != 0) return CUDA_ERROR_INVALID_VALUE;
    if (alignment != 0 && ((alignment & (alignment - 1)) != 0)) return CUDA_ERROR_INVALID_VALUE;
    size_t align = alignment > g_granularity ? alignment : g_granularity;
    /* Over-reserve and trim so the base is aligned; NORESERVE: this is address space only. */
    size_t span = size + align;
    void *raw = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    uintptr_t base = ((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1);
    if (base > (uintptr_t)raw) munmap(raw, base - (uintptr_t)raw);
    uintptr_t tail = base + size, raw_end = (uintptr_t)raw + span;
    if (raw_end > tail) munmap((void *)tail, raw_end - tail);

    pthread_mutex_lock(&g_lock);
    if (g_nres == g_capres) {
        size_t cap = g_capres ? g_capres * 2 : 16;
        struct reservation *n = realloc(g_res, cap * sizeof *n);
        if (!n) {
            pthread_mutex_unlock(&g_lock);
            munmap((void *)base, size);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        g_res = n;
        g_capres = cap;
    }
    g_res[g_nres++] = (struct reservation){.base = base, .size = size};
    pthread_mutex_unlock(&g_lock);
    gauge_add(C_LIVE_RESERVATIONS, 1);
    *ptr = (CUdeviceptr)base;
    return CUDA_SUCCESS;
}

static CUresult fake_cuMemAddressFree(CUdeviceptr ptr, size_t size) {
    count(C_cuMemAddressFree);
    CUresult rc = require_context();
    if (rc) return rc;
    pthread_mutex_lock(&g_lock);
    for (size_t i = 0; i < g_nres; i++) {
        struct reservation *r = &g_res[i];
        if (r->base != (uintptr_t)ptr) continue;
        if (r->size != size || r->nmaps != 0) break;
        munmap((void *)r->base, r->size);
        free(r->maps);
        g_res[i] = g_res[--g_nres];
        pthread_mutex_unlock(&g_lock);
        gauge_add(C_LIVE_RESERVATIONS, -1);
        return CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_lock);
    return CUDA_ERROR_INVALID_VALUE;
}

/* The driver commits a physical allocation's memory at cuMemCreate, which is where it reports
 * OUT_OF_MEMORY (CUDA driver API reference, cuMemCreate); nothing is allocated later on first
 * touch. So the memfd's memory is allocated here (fallocate: the kernel allocates and zeroes it),
 * failing with OUT_OF_MEMORY if the host cannot, rather than page by page at the first memset or
 * copy, where a shortage would be a SIGBUS. The capacity is charged first, under the lock; the
 * allocation runs outside it, so several threads create at once as they may on a device. */
static CUresult fake_cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop, unsigned long long flags) {
    count(C_cuMemCreate);
    CUresult rc = require_context();
    if (rc) return rc;
    if (!handle || size == 0 || !aligned(size) || flags != 0) return CUDA_ERROR_INVALID_VALUE;
    if ((rc = check_prop(prop))) return rc;
    pthread_mutex_lock(&g_lock);
    if (g_charged_bytes + size > g_capacity) {
        pthread_mutex_unlock(&g_lock);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    g_charged_bytes += size;
    pthread_mutex_unlock(&g_lock);
    int fd = memfd_create("fakecuda-page", MFD_CLOEXEC);
    struct physical *p = fd >= 0 ? calloc(1, sizeof *p) : NULL;
    CUmemGenericAllocationHandle h = 0;
    if (p && ftruncate(fd, (off_t)size) == 0 && fallocate(fd, 0, 0, (off_t)size) == 0) {
        *p = (struct physical){.memfd = fd, .size = size, .handle_types = prop->requestedHandleTypes, .refs = 1, .charged = 1};
        pthread_mutex_lock(&g_lock);
        h = handle_add(p);
        if (!h) g_charged_bytes -= size;
        pthread_mutex_unlock(&g_lock);
    } else {
        pthread_mutex_lock(&g_lock);
        g_charged_bytes -= size;
        pthread_mutex_unlock(&g_lock);
    }
    if (!h) {
        if (fd >= 0) close(fd);
        free(p);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    gauge_add(C_CHARGED_BYTES, (int64_t)size);
    gauge_add(C_LIVE_ALLOCATIONS, 1);
    *handle = h;
    return CUDA_SUCCESS;
}

static CUresult fake_cuMemRelease(CUmemGenericAllocationHandle handle) {
    count(C_cuMemRelease);
    CUresult rc = require_context();
    if (rc) return rc;
    pthread_mutex_lock(&g_lock);
    struct physical *p = handle_get(handle);
    if (!p) {
        pthread_mutex_unlock(&g_lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    g_handles[handle - 1] = NULL;
    physical_unref(p); /* memory stays while mappings hold it */
    pthread_mutex_unlock(&g_lock);
    gauge_add(C_LIVE_HANDLES, -1);
    return CUDA_SUCCESS;
}

static CUresult fake_cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle, unsigned long long flags) {
    count(C_cuMemMap);
    CUresult rc = require_context();
    if (rc) return rc;
    /* "offset ... currently must be zero" and "flags ... must be zero" (cuMemMap reference). */
    if (size == 0 || !aligned(ptr) || !aligned(size) || offset != 0 || flags != 0) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    struct physical *p = handle_get(handle);
    struct reservation *r = find_reservation((uintptr_t)ptr);
    if (!p) rc = CUDA_ERROR_INVALID_HANDLE;
    else if (!r || (uintptr_t)ptr + size > r->base + r->size || size > p->size) rc = CUDA_ERROR_INVALID_VALUE;
    size_t off = r ? (size_t)((uintptr_t)ptr - r->base) : 0;
    size_t pos = 0;
    if (!rc) {
        while (pos < r->nmaps && r->maps[pos].offset < off) pos++;
        int overlaps_prev = pos > 0 && r->maps[pos - 1].offset + r->maps[pos - 1].size > off;
        int overlaps_next = pos < r->nmaps && r->maps[pos].offset < off + size;
        if (overlaps_prev || overlaps_next) rc = CUDA_ERROR_ALREADY_MAPPED;
    }
    if (!rc && r->nmaps == r->capmaps) {
        size_t cap = r->capmaps ? r->capmaps * 2 : 16;
        struct mapping *n = realloc(r->maps, cap * sizeof *n);
        if (!n) rc = CUDA_ERROR_OUT_OF_MEMORY;
        else {
            r->maps = n;
            r->capmaps = cap;
        }
    }
    if (!rc && mmap((void *)(uintptr_t)ptr, size, PROT_NONE, MAP_SHARED | MAP_FIXED, p->memfd, 0) == MAP_FAILED)
        rc = CUDA_ERROR_OUT_OF_MEMORY;
    if (rc) {
        pthread_mutex_unlock(&g_lock);
        return rc;
    }
    memmove(&r->maps[pos + 1], &r->maps[pos], (r->nmaps - pos) * sizeof *r->maps);
    r->maps[pos] = (struct mapping){.offset = off, .size = size, .phys = p, .access = CU_MEM_ACCESS_FLAGS_PROT_NONE};
    r->nmaps++;
    p->refs++;
    pthread_mutex_unlock(&g_lock);
    gauge_add(C_LIVE_MAPPINGS, 1);
    return CUDA_SUCCESS;
}

static CUresult fake_cuMemUnmap(CUdeviceptr ptr, size_t size) {
    count(C_cuMemUnmap);
    CUresult rc = require_context();
    if (rc) return rc;
    if (size == 0 || !aligned(ptr) || !aligned(size)) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    struct reservation *r = find_reservation((uintptr_t)ptr);
    if (!r || (uintptr_t)ptr + size > r->base + r->size) {
        pthread_mutex_unlock(&g_lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    size_t off = (size_t)((uintptr_t)ptr - r->base), end = off + size;
    /* The range must be exactly a run of whole, adjacent mappings. */
    size_t first = 0;
    while (first < r->nmaps && r->maps[first].offset < off) first++;
    size_t last = first, cursor = off;
    while (last < r->nmaps && cursor < end && r->maps[last].offset == cursor) {
        cursor += r->maps[last].size;
        last++;
    }
    if (first == last || cursor != end) {
        pthread_mutex_unlock(&g_lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    void *back = mmap((void *)(uintptr_t)ptr, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    if (back == MAP_FAILED) {
        pthread_mutex_unlock(&g_lock);
        return CUDA_ERROR_UNKNOWN;
    }
    for (size_t i = first; i < last; i++) physical_unref(r->maps[i].phys);
    memmove(&r->maps[first], &r->maps[last], (r->nmaps - last) * sizeof *r->maps);
    r->nmaps -= last - first;
    pthread_mutex_unlock(&g_lock);
    gauge_add(C_LIVE_MAPPINGS, -(int64_t)(last - first));
    return CUDA_SUCCESS;
}

static CUresult fake_cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count_) {
    count(C_cuMemSetAccess);
    CUresult rc = require_context();
    if (rc) return rc;
    if (size == 0 || !aligned(ptr) || !aligned(size) || !desc || count_ == 0) return CUDA_ERROR_INVALID_VALUE;
    int access = -1;
    for (size_t i = 0; i < count_; i++) {
        if (desc[i].location.type != CU_MEM_LOCATION_TYPE_DEVICE) return CUDA_ERROR_INVALID_VALUE;
        if (desc[i].location.id < 0 || desc[i].location.id >= g_device_count) return CUDA_ERROR_INVALID_DEVICE;
        if (desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_NONE && desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_READ &&
            desc[i].flags != CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
            return CUDA_ERROR_INVALID_VALUE;
        /* One host, so the fake has one view: the most permissive access granted wins. */
        if (desc[i].flags > access) access = desc[i].flags;
    }
    pthread_mutex_lock(&g_lock);
    struct reservation *r = find_reservation((uintptr_t)ptr);
    if (!r || (uintptr_t)ptr + size > r->base + r->size) {
        pthread_mutex_unlock(&g_lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    size_t off = (size_t)((uintptr_t)ptr - r->base), end = off + size, cursor = off;
    size_t first = r->nmaps;
    for (size_t i = 0; i < r->nmaps && cursor < end; i++) {
        struct mapping *m = &r->maps[i];
        if (m->offset + m->size <= cursor) continue;
        if (m->offset > cursor) break; /* a hole: part of the range is not mapped */
        if (first == r->nmaps) first = i;
        cursor = m->offset + m->size;
    }
    if (cursor < end) {
        pthread_mutex_unlock(&g_lock);
        return CUDA_ERROR_INVALID_VALUE;
    }
    int prot = access == CU_MEM_ACCESS_FLAGS_PROT_READWRITE ? PROT_READ | PROT_WRITE
             : access == CU_MEM_ACCESS_FLAGS_PROT_READ      ? PROT_READ
                                                            : PROT_NONE;
    if (mprotect((void *)(uintptr_t)ptr, size, prot) != 0) {
        pthread_mutex_unlock(&g_lock);
        return CUDA_ERROR_UNKNOWN;
    }
    /* Access is tracked per mapping; a mapping only partly covered keeps its old access. */
    for (size_t i = first; i < r->nmaps && r->maps[i].offset < end; i++)
        if (r->maps[i].offset >= off && r->maps[i].offset + r->maps[i].size <= end) r->maps[i].access = access;
    pthread_mutex_unlock(&g_lock);
    return CUDA_SUCCESS;
}

static CUresult fake_cuMemExportToShareableHandle(void *shareable, CUmemGenericAllocationHandle handle, int type, unsigned long long flags) {
    count(C_cuMemExportToShareableHandle);
    CUresult rc = require_context();
    if (rc) return rc;
    if (!shareable || flags != 0) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    struct physical *p = handle_get(handle);
    if (!p) rc = CUDA_ERROR_INVALID_VALUE;
    else if (type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR || !(p->handle_types & type)) rc = CUDA_ERROR_INVALID_VALUE;
    int fd = rc ? -1 : fcntl(p->memfd, F_DUPFD_CLOEXEC, 0);
    pthread_mutex_unlock(&g_lock);
    if (rc) return rc;
    if (fd < 0) return CUDA_ERROR_OUT_OF_MEMORY;
    *(int *)shareable = fd;
    return CUDA_SUCCESS;
}

/* Only a descriptor this fake exported (a "fakecuda-page" memfd) imports; the caller keeps
 * ownership of the descriptor it passed, as with the driver. */
static CUresult fake_cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *handle, void *os_handle, int type) {
    count(C_cuMemImportFromShareableHandle);
    CUresult rc = require_context();
    if (rc) return rc;
    if (!handle || type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) return CUDA_ERROR_INVALID_VALUE;
    int fd = (int)(intptr_t)os_handle;
    char link[64], target[128];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n <= 0) return CUDA_ERROR_INVALID_VALUE;
    target[n] = '\0';
    if (strncmp(target, "/memfd:fakecuda-page", 20) != 0) return CUDA_ERROR_INVALID_VALUE;
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size <= 0 || !aligned((uint64_t)st.st_size)) return CUDA_ERROR_INVALID_VALUE;
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0) return CUDA_ERROR_OUT_OF_MEMORY;
    struct physical *p = calloc(1, sizeof *p);
    if (!p) {
        close(own);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *p = (struct physical){.memfd = own, .size = (size_t)st.st_size, .handle_types = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, .refs = 1};
    pthread_mutex_lock(&g_lock);
    CUmemGenericAllocationHandle h = handle_add(p);
    pthread_mutex_unlock(&g_lock);
    if (!h) {
        close(own);
        free(p);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    gauge_add(C_LIVE_ALLOCATIONS, 1);
    *handle = h;
    return CUDA_SUCCESS;
}

static CUresult fake_cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t n) {
    count(C_cuMemsetD8);
    CUresult rc = require_context();
    if (rc) return rc;
    pthread_mutex_lock(&g_lock);
    rc = check_device_range(dst, n, CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
    if (!rc) {
        /* A GPU memsets at memory speed; here a first write to each 4 KiB page of a fresh mapping
         * is a fault, which costs more than the memset itself (the daemon zeroes every new page).
         * One MADV_POPULATE_WRITE (Linux 5.14) maps the range's pages first, at about half the
         * cost of faulting them one by one. Only an aid: if it fails, the memset faults them in.
         * The range lies in mappings of whole granules, so its 4 KiB pages do too. */
        uintptr_t start = (uintptr_t)dst & ~(uintptr_t)4095;
        (void)madvise((void *)start, (uintptr_t)dst + n - start, MADV_POPULATE_WRITE);
        memset((void *)(uintptr_t)dst, value, n);
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

static CUresult fake_cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
    count(C_cuMemcpyHtoD);
    CUresult rc = require_context();
    if (rc) return rc;
    if (!src && n) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    rc = check_device_range(dst, n, CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
    if (!rc && ++g_copies == g_fail_copy_at) rc = CUDA_ERROR_UNKNOWN; /* injected (see the top) */
    if (!rc) memcpy((void *)(uintptr_t)dst, src, n);
    pthread_mutex_unlock(&g_lock);
    return rc;
}

static CUresult fake_cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
    count(C_cuMemcpyDtoH);
    CUresult rc = require_context();
    if (rc) return rc;
    if (!dst && n) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_lock);
    rc = check_device_range(src, n, CU_MEM_ACCESS_FLAGS_PROT_READ);
    if (!rc && ++g_copies == g_fail_copy_at) rc = CUDA_ERROR_UNKNOWN; /* injected (see the top) */
    if (!rc) memcpy(dst, (void *)(uintptr_t)src, n);
    pthread_mutex_unlock(&g_lock);
    return rc;
}

static CUresult fake_cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    count(C_cuMemcpyDtoD);
    CUresult rc = require_context();
    if (rc) return rc;
    pthread_mutex_lock(&g_lock);
    rc = check_device_range(src, n, CU_MEM_ACCESS_FLAGS_PROT_READ);
    if (!rc) rc = check_device_range(dst, n, CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
    if (!rc) memmove((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n);
    pthread_mutex_unlock(&g_lock);
    return rc;
}

struct error_text {
    CUresult code;
    const char *name, *text;
};
static const struct error_text k_errors[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_ALREADY_MAPPED, "CUDA_ERROR_ALREADY_MAPPED", "resource already mapped"},
    {CUDA_ERROR_NOT_MAPPED, "CUDA_ERROR_NOT_MAPPED", "resource not mapped"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

static const struct error_text *error_lookup(CUresult error) {
    for (size_t i = 0; i < sizeof k_errors / sizeof *k_errors; i++)
        if (k_errors[i].code == error) return &k_errors[i];
    return NULL;
}

static CUresult fake_cuGetErrorName(CUresult error, const char **out) {
    count(C_cuGetErrorName);
    const struct error_text *e = error_lookup(error);
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    *out = e ? e->name : NULL;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

static CUresult fake_cuGetErrorString(CUresult error, const char **out) {
    count(C_cuGetErrorString);
    const struct error_text *e = error_lookup(error);
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    *out = e ? e->text : NULL;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* ---- cuGetProcAddress: the only symbol the bindings dlsym ---- */

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cuda_version, unsigned long long flags, int *status);

/* Page-locked host memory. The real driver pins it (and maps it for the device when asked); here it is
 * ordinary memory, but the contract is kept: a context must be current, the flags must be known bits,
 * and only a pointer cuMemHostAlloc returned may be freed, once. */
#define FAKE_HOST_ALLOCS 16384
#define CU_MEMHOSTALLOC_KNOWN_FLAGS 0x7u /* PORTABLE | DEVICEMAP | WRITECOMBINED */
static struct {
    void *ptr;
    size_t size;
} g_host_allocs[FAKE_HOST_ALLOCS];

static CUresult fake_cuMemHostAlloc(void **pp, size_t n, unsigned int flags) {
    count(C_cuMemHostAlloc);
    CUresult rc = require_context();
    if (rc) return rc;
    if (!pp || n == 0 || (flags & ~CU_MEMHOSTALLOC_KNOWN_FLAGS)) return CUDA_ERROR_INVALID_VALUE;
    while (g_host_alloc_gate && access(g_host_alloc_gate, F_OK) != 0) usleep(1000); /* (no lock held) */
    void *mem = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&g_lock);
    int slot = -1;
    if (!g_pinned_limit || n <= g_pinned_limit - g_pinned_bytes)
        for (int i = 0; i < FAKE_HOST_ALLOCS && slot < 0; i++)
            if (!g_host_allocs[i].ptr) slot = i;
    if (slot >= 0) {
        g_host_allocs[slot].ptr = mem;
        g_host_allocs[slot].size = n;
        g_pinned_bytes += n;
    }
    pthread_mutex_unlock(&g_lock);
    if (slot < 0) {
        munmap(mem, n);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    gauge_add(C_LIVE_HOST_ALLOCATIONS, 1);
    *pp = mem;
    return CUDA_SUCCESS;
}

static CUresult fake_cuMemFreeHost(void *p) {
    count(C_cuMemFreeHost);
    CUresult rc = require_context();
    if (rc) return rc;
    pthread_mutex_lock(&g_lock);
    int slot = -1;
    for (int i = 0; i < FAKE_HOST_ALLOCS && slot < 0; i++)
        if (p && g_host_allocs[i].ptr == p) slot = i;
    size_t size = slot >= 0 ? g_host_allocs[slot].size : 0;
    if (slot >= 0) {
        g_host_allocs[slot].ptr = NULL;
        g_pinned_bytes -= size;
    }
    pthread_mutex_unlock(&g_lock);
    if (slot < 0) return CUDA_ERROR_INVALID_VALUE;
    munmap(p, size);
    gauge_add(C_LIVE_HOST_ALLOCATIONS, -1);
    return CUDA_SUCCESS;
}

/* (name, the CUDA version that introduced this ABI variant, implementation). The names and
 * versions are those cuda-bindings 12.9 and 13.x request (recorded through this table's lookup
 * log; tests/test_fakecuda_abi.py keeps them in step). */
struct proc_entry {
    const char *name;
    int version;
    void *fn;
};
static const struct proc_entry k_procs[] = {
    {"cuGetProcAddress", 12000, (void *)cuGetProcAddress_v2},
    {"cuGetErrorName", 6000, (void *)fake_cuGetErrorName},
    {"cuGetErrorString", 6000, (void *)fake_cuGetErrorString},
    {"cuInit", 2000, (void *)fake_cuInit},
    {"cuDriverGetVersion", 2020, (void *)fake_cuDriverGetVersion},
    {"cuDeviceGetCount", 2000, (void *)fake_cuDeviceGetCount},
    {"cuDeviceGet", 2000, (void *)fake_cuDeviceGet},
    {"cuDeviceGetName", 2000, (void *)fake_cuDeviceGetName},
    {"cuDeviceGetUuid", 11040, (void *)fake_cuDeviceGetUuid},
    {"cuDeviceTotalMem", 3020, (void *)fake_cuDeviceTotalMem_v2},
    {"cuDeviceGetAttribute", 2000, (void *)fake_cuDeviceGetAttribute},
    {"cuDevicePrimaryCtxRetain", 7000, (void *)fake_cuDevicePrimaryCtxRetain},
    {"cuDevicePrimaryCtxRelease", 11000, (void *)fake_cuDevicePrimaryCtxRelease_v2},
    {"cuCtxSetCurrent", 4000, (void *)fake_cuCtxSetCurrent},
    {"cuCtxGetCurrent", 4000, (void *)fake_cuCtxGetCurrent},
    {"cuCtxSynchronize", 2000, (void *)fake_cuCtxSynchronize},
    {"cuCtxSynchronize", 13000, (void *)fake_cuCtxSynchronize_v2},
    {"cuMemGetInfo", 3020, (void *)fake_cuMemGetInfo_v2},
    {"cuMemGetAllocationGranularity", 10020, (void *)fake_cuMemGetAllocationGranularity},
    {"cuMemAddressReserve", 10020, (void *)fake_cuMemAddressReserve},
    {"cuMemAddressFree", 10020, (void *)fake_cuMemAddressFree},
    {"cuMemCreate", 10020, (void *)fake_cuMemCreate},
    {"cuMemRelease", 10020, (void *)fake_cuMemRelease},
    {"cuMemMap", 10020, (void *)fake_cuMemMap},
    {"cuMemUnmap", 10020, (void *)fake_cuMemUnmap},
    {"cuMemSetAccess", 10020, (void *)fake_cuMemSetAccess},
    {"cuMemExportToShareableHandle", 10020, (void *)fake_cuMemExportToShareableHandle},
    {"cuMemImportFromShareableHandle", 10020, (void *)fake_cuMemImportFromShareableHandle},
    {"cuMemsetD8", 3020, (void *)fake_cuMemsetD8_v2},
    {"cuMemcpyHtoD", 3020, (void *)fake_cuMemcpyHtoD_v2},
    {"cuMemcpyDtoH", 3020, (void *)fake_cuMemcpyDtoH_v2},
    {"cuMemcpyDtoD", 3020, (void *)fake_cuMemcpyDtoD_v2},
    {"cuMemHostAlloc", 2020, (void *)fake_cuMemHostAlloc},
    {"cuMemFreeHost", 2000, (void *)fake_cuMemFreeHost},
};

#define MAX_LOOKUPS 4096
struct lookup_record {
    char name[NAME_LEN];
    int version;
    int found;
};
static struct lookup_record g_lookups[MAX_LOOKUPS];
static int g_nlookups;

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cuda_version, unsigned long long flags, int *status) {
    count(C_cuGetProcAddress);
    if (!symbol || !pfn) return CUDA_ERROR_INVALID_VALUE;
    (void)flags; /* every fake call is synchronous: the default-stream flavours are one ABI */
    *pfn = NULL;
    int name_known = 0;
    for (size_t i = 0; i < sizeof k_procs / sizeof *k_procs; i++) {
        if (strcmp(k_procs[i].name, symbol) != 0) continue;
        name_known = 1;
        if (k_procs[i].version == cuda_version) *pfn = k_procs[i].fn;
    }
    pthread_mutex_lock(&g_lock);
    if (g_nlookups < MAX_LOOKUPS) {
        struct lookup_record *rec = &g_lookups[g_nlookups++];
        strncpy(rec->name, symbol, NAME_LEN - 1);
        rec->version = cuda_version;
        rec->found = *pfn != NULL;
    }
    pthread_mutex_unlock(&g_lock);
    if (status)
        *status = *pfn ? CU_GET_PROC_ADDRESS_SUCCESS
                : name_known ? CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT
                             : CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    return *pfn ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}

/* ---- introspection for tests and benchmarks (not part of the driver API) ---- */

uint64_t fakecuda_counter(const char *name) {
    pthread_once(&g_counters_once, counters_setup);
    if (!g_counters || !name) return 0;
    for (int i = 0; i < C_COUNT; i++)
        if (strcmp(k_counter_names[i], name) == 0) return __atomic_load_n(&g_counters->entries[i].value, __ATOMIC_RELAXED);
    return (uint64_t)-1;
}

void fakecuda_reset_call_counters(void) {
    pthread_once(&g_counters_once, counters_setup);
    if (!g_counters) return;
    for (int i = 0; i < C_LIVE_RESERVATIONS; i++) __atomic_store_n(&g_counters->entries[i].value, 0, __ATOMIC_RELAXED);
}

int fakecuda_table_size(void) { return (int)(sizeof k_procs / sizeof *k_procs); }

int fakecuda_table_entry(int i, const char **name, int *version) {
    if (i < 0 || i >= fakecuda_table_size()) return -1;
    *name = k_procs[i].name;
    *version = k_procs[i].version;
    return 0;
}

int fakecuda_lookup_count(void) { return g_nlookups; }

int fakecuda_lookup_entry(int i, const char **name, int *version, int *found) {
    if (i < 0 || i >= g_nlookups) return -1;
    *name = g_lookups[i].name;
    *version = g_lookups[i].version;
    *found = g_lookups[i].found;
    return 0;
}
