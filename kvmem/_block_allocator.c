/* kvmem._block_allocator: the page-aware block allocator, in C (see kvmem/block_allocator.py).
 *
 * Design note
 * -----------
 * Why C. `ElasticKVCache.alloc`/`free` are called by engines once per request step; the goal
 * (benchmarks/README.md, "Block allocator") is to cost no more than a list-slice free list behind a
 * lock. Pure Python bookkeeping per slot could not get there (0.42-0.62x); this file does the same
 * bookkeeping with bit operations, and the cache's hot path is one call into it.
 *
 * Policy (unchanged from the Python version; tests/test_block_allocator.py states it id by id):
 * blocks come from the fullest mapped, non-full slots first, the lowest slot first among equals, the
 * lowest free block first within a slot; ids come back slot by slot, ascending within each slot.
 *
 * State, for `max_slots` slots of `bps` blocks each (block b lies on slot b / bps):
 * - mapped[s], used[s]: whether slot s is mapped; its blocks in use (0 when not mapped).
 * - free_bits[s * wps ...]: one bit per block of slot s, set iff the block is free on a mapped slot
 *   (wps = 64-bit words per slot; bits past bps are never set).
 * - buckets: bps sets of slots, set u holding the mapped slots with u blocks in use (u < bps); each
 *   set is a bitset with summary levels (`BitSets`), so its lowest slot is found in a few `ctz`s.
 * - mask: the set of u whose bucket is not empty; its highest member is the fullest bucket.
 * - ints[s]: the int objects of slot s's block ids (made when s is first mapped, kept until the
 *   allocator goes: 8 bytes of pointer and at most 32 of int per block of a slot ever mapped), so
 *   that alloc hands out references, as a free list's slice does, and makes no object.
 * - pending[s], touched[]: scratch of one free or take (blocks of the batch per slot, the slots it
 *   touches), so that the buckets move once per slot, not once per id.
 *
 * Invariants (checked by `_check()`, which the tests call after every step):
 * - a block id is handed out at most once until freed, and only from a mapped slot;
 * - used[s] + popcount(free bits of s) == bps for every mapped slot; an unmapped slot has used 0
 *   and no free bit;
 * - s is in bucket u iff s is mapped, used[s] == u and u < bps (a full slot is in no bucket);
 * - u is in mask iff bucket u is not empty; every summary bit is set iff its word below is not 0;
 * - num_free is the number of free bits, num_mapped the mapped slots, num_empty bucket 0's size;
 * - pending[s] is 0 between calls (it counts one batch's blocks per slot inside free/take).
 *
 * Cost. alloc takes words of free bits from the lowest slot of the fullest bucket: a few bit
 * operations per slot touched and one incref per id. free and take of a run of consecutive ids (as
 * alloc hands them out, ascending, or tail first as vLLM frees them; a free queue's run for take)
 * check and flip whole words of free bits per slot; any other batch costs a few operations per id
 * (no division while ids stay on one slot), take sorting it first. Ids are read from the batch
 * without a call when they are exact ints below 2**30 (`small_int`).
 *
 * Thread safety. Every method holds the allocator's own mutex (PyMutex from Python 3.13, where it
 * also serves free-threaded builds; before 3.13, GIL builds only, an atomic flag: see `Mutex`) for
 * the whole of its state work, so each call is atomic; the GIL is not relied on. Nothing that can
 * run Python code happens under the mutex: arguments are converted to C before it is taken, result
 * lists are made before it is taken (alloc fills its list under it) or after it is released, and an
 * error is only recorded under it and raised afterwards. (A finalizer run by the garbage collector
 * could otherwise call back into this allocator and deadlock on its own mutex.) Under the mutex only
 * C arithmetic and increfs of the cached id objects happen. The Python calls an allocator makes,
 * the growth wake-up and the first-take hook, are made after the mutex is released. A caller must
 * not change a batch (a list) from another thread while it is being freed or taken, as with any C
 * function reading a list.
 *
 * Errors change nothing: free and take check every id of a batch before anything is given back or
 * taken (free undoes the bits it set while checking); every id and slot is bounds-checked before it
 * is used as an index; memory is allocated before the mutex is taken, so running out of it leaves
 * the state as it was. A bad id is a ValueError naming it, with the Python version's messages.
 *
 * The gate. An `ElasticKVCache` asleep or closed must not hand out blocks: `paused` and `closed`
 * close `alloc_exact` (None) and `try_take` (False) under the same mutex, so no block is handed out
 * after the flag is set, whatever thread sets it. `alloc`, `take` and `free` ignore the gate.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#if PY_VERSION_HEX < 0x030B0000
#include <longintrepr.h> /* Python 3.10: ob_digit (3.11 includes it from Python.h) */
#endif

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Batches up to this many ids are converted into a buffer on the stack. */
#define STACK_IDS 256
/* Levels of a BitSets: 64^12 bits is more than any Py_ssize_t. */
#define MAX_DEPTH 12

/* ---- sets of bits with summary levels ---- */

/* `count` sets of `nbits` bits each. Level 0 holds the bits; bit i of level l+1 is set iff word i
 * of level l (of the same set) is not 0; the top level is one word per set. */
typedef struct {
    int depth;
    Py_ssize_t nwords[MAX_DEPTH];
    uint64_t *words[MAX_DEPTH];
} BitSets;

static int bitsets_init(BitSets *bs, Py_ssize_t count, Py_ssize_t nbits) {
    Py_ssize_t n = (nbits + 63) / 64;
    memset(bs, 0, sizeof(*bs));
    for (;;) {
        bs->nwords[bs->depth] = n;
        bs->words[bs->depth] = PyMem_Calloc((size_t)(count * n), sizeof(uint64_t));
        if (bs->words[bs->depth] == NULL)
            return -1;
        bs->depth++;
        if (n == 1)
            return 0;
        n = (n + 63) / 64;
    }
}

static void bitsets_free(BitSets *bs) {
    for (int l = 0; l < bs->depth; l++) {
        PyMem_Free(bs->words[l]);
        bs->words[l] = NULL;
    }
    bs->depth = 0;
}

static inline int bitsets_has(const BitSets *bs, Py_ssize_t set, Py_ssize_t i) {
    return (int)((bs->words[0][set * bs->nwords[0] + (i >> 6)] >> (i & 63)) & 1);
}

/* Adds i to `set`; returns 1 if the set was empty before. */
static inline int bitsets_add(BitSets *bs, Py_ssize_t set, Py_ssize_t i) {
    for (int l = 0; l < bs->depth; l++) {
        uint64_t *w = &bs->words[l][set * bs->nwords[l] + (i >> 6)];
        uint64_t was = *w;
        *w = was | ((uint64_t)1 << (i & 63));
        if (was)
            return 0;
        i >>= 6;
    }
    return 1;
}

/* Removes i (a member) from `set`; returns 1 if the set is empty now. */
static inline int bitsets_remove(BitSets *bs, Py_ssize_t set, Py_ssize_t i) {
    for (int l = 0; l < bs->depth; l++) {
        uint64_t *w = &bs->words[l][set * bs->nwords[l] + (i >> 6)];
        *w &= ~((uint64_t)1 << (i & 63));
        if (*w)
            return 0;
        i >>= 6;
    }
    return 1;
}

/* The lowest member of `set`, or -1. */
static inline Py_ssize_t bitsets_lowest(const BitSets *bs, Py_ssize_t set) {
    int top = bs->depth - 1;
    uint64_t w = bs->words[top][set];
    if (!w)
        return -1;
    Py_ssize_t i = __builtin_ctzll(w);
    for (int l = top - 1; l >= 0; l--)
        i = i * 64 + __builtin_ctzll(bs->words[l][set * bs->nwords[l] + i]);
    return i;
}

/* The highest member of `set`, or -1. */
static inline Py_ssize_t bitsets_highest(const BitSets *bs, Py_ssize_t set) {
    int top = bs->depth - 1;
    uint64_t w = bs->words[top][set];
    if (!w)
        return -1;
    Py_ssize_t i = 63 - __builtin_clzll(w);
    for (int l = top - 1; l >= 0; l--)
        i = i * 64 + (63 - __builtin_clzll(bs->words[l][set * bs->nwords[l] + i]));
    return i;
}

/* ---- the mutex ---- */

#if PY_VERSION_HEX >= 0x030D0000
typedef PyMutex Mutex;
static int mutex_init(Mutex *m) {
    memset(m, 0, sizeof(*m));
    return 0;
}
static void mutex_fini(Mutex *m) { (void)m; }
static inline void mutex_lock(Mutex *m) { PyMutex_Lock(m); } /* detaches from the interpreter while it waits */
static inline void mutex_unlock(Mutex *m) { PyMutex_Unlock(m); }
#else
/* Before 3.13 (GIL builds only): a flag taken with an atomic exchange. Uncontended (always, in
 * practice: a holder never lets go of the GIL while it holds the flag) it costs one atomic
 * instruction, a tenth of a PyThread lock. A thread that finds it taken waits without the GIL,
 * yielding the CPU, until the holder (a few microseconds of C at most) lets go. */
#include <sched.h>
typedef int Mutex;
static int mutex_init(Mutex *m) {
    *m = 0;
    return 0;
}
static void mutex_fini(Mutex *m) { (void)m; }
static inline void mutex_lock(Mutex *m) {
    if (__atomic_exchange_n(m, 1, __ATOMIC_ACQUIRE) == 0)
        return;
    Py_BEGIN_ALLOW_THREADS while (__atomic_exchange_n(m, 1, __ATOMIC_ACQUIRE) != 0) sched_yield();
    Py_END_ALLOW_THREADS
}
static inline void mutex_unlock(Mutex *m) { __atomic_store_n(m, 0, __ATOMIC_RELEASE); }
#endif

/* ---- the allocator ---- */

typedef struct {
    PyObject_HEAD
    Py_ssize_t bps, max_slots, max_blocks, wps;
    uint64_t *free_bits;    /* [max_slots * wps] */
    Py_ssize_t *used;       /* [max_slots] */
    Py_ssize_t *pending;    /* [max_slots] scratch of free/take, 0 between calls */
    Py_ssize_t *touched;    /* [max_slots] scratch of free/take: the slots a batch touches */
    unsigned char *mapped;  /* [max_slots] */
    PyObject ***ints;       /* [max_slots]: NULL, or bps references to the ids of the slot */
    BitSets buckets;        /* bps sets of max_slots bits */
    BitSets mask;           /* one set of bps bits */
    Py_ssize_t num_free, num_mapped, num_empty;
    Py_ssize_t low_watermark;
    PyObject *wake; /* NULL or a callable: `set_low_watermark` */
    PyObject *first_take; /* NULL or a callable, called once: `arm_first_take` */
    char paused, closed, wake_pending;
    Mutex mutex;
} Allocator;

static PyTypeObject AllocatorType;

#define LOCK(a) mutex_lock(&(a)->mutex)
#define UNLOCK(a) mutex_unlock(&(a)->mutex)

/* Bucket moves (mutex held). */
static inline void bucket_add(Allocator *a, Py_ssize_t u, Py_ssize_t slot) {
    if (bitsets_add(&a->buckets, u, slot))
        bitsets_add(&a->mask, 0, u);
    if (u == 0)
        a->num_empty++;
}

static inline void bucket_remove(Allocator *a, Py_ssize_t u, Py_ssize_t slot) {
    if (bitsets_remove(&a->buckets, u, slot))
        bitsets_remove(&a->mask, 0, u);
    if (u == 0)
        a->num_empty--;
}

/* Slot `slot` goes from `before` to `after` blocks in use (mutex held). */
static inline void slot_moves(Allocator *a, Py_ssize_t slot, Py_ssize_t before, Py_ssize_t after) {
    if (before < a->bps)
        bucket_remove(a, before, slot);
    a->used[slot] = after;
    if (after < a->bps)
        bucket_add(a, after, slot);
}

/* The `k` lowest free blocks of mapped `slot` (it has that many) into `out` as new references, their
 * bits cleared (mutex held; the caller accounts for used, buckets and num_free). */
static inline void take_lowest(Allocator *a, Py_ssize_t slot, Py_ssize_t k, PyObject **out) {
    uint64_t *fb = a->free_bits + slot * a->wps;
    PyObject **ints = a->ints[slot];
    for (Py_ssize_t w = 0; k; w++) {
        uint64_t bits = fb[w];
        while (bits && k) {
            PyObject *id = ints[w * 64 + __builtin_ctzll(bits)];
            Py_INCREF(id);
            *out++ = id;
            bits &= bits - 1;
            k--;
        }
        fb[w] = bits;
    }
}

/* Whether blocks lo..hi (lo <= hi, both of mapped `slot`) are all free (want 1) or all in use
 * (want 0), word by word; then, if `flip`, each one's bit is flipped (mutex held). */
static inline int run_is(Allocator *a, Py_ssize_t slot, Py_ssize_t lo, Py_ssize_t hi, int want, int flip) {
    uint64_t *fb = a->free_bits + slot * a->wps;
    Py_ssize_t k0 = lo - slot * a->bps, k1 = hi - slot * a->bps;
    for (Py_ssize_t w = k0 >> 6; w <= k1 >> 6; w++) {
        int first = (int)(w == (k0 >> 6) ? k0 & 63 : 0), last = (int)(w == (k1 >> 6) ? k1 & 63 : 63);
        uint64_t mask = (last == 63 ? ~(uint64_t)0 : ((uint64_t)1 << (last + 1)) - 1) & ~(((uint64_t)1 << first) - 1);
        if ((fb[w] & mask) != (want ? mask : 0))
            return 0;
        if (flip)
            fb[w] ^= mask;
    }
    return 1;
}

/* Whether consecutive blocks lo..hi lie on mapped slots and are all free (want 1) or all in use
 * (want 0) (mutex held). */
static int run_check(Allocator *a, long long lo, long long hi, int want) {
    if (lo < 0 || hi >= a->max_blocks)
        return 0;
    for (Py_ssize_t s = (Py_ssize_t)(lo / a->bps); (long long)s * a->bps <= hi; s++) {
        Py_ssize_t first = s * a->bps, last = first + a->bps - 1;
        Py_ssize_t from = lo > first ? (Py_ssize_t)lo : first, to = hi < last ? (Py_ssize_t)hi : last;
        if (!a->mapped[s] || !run_is(a, s, from, to, want, 0))
            return 0;
    }
    return 1;
}

/* Flips the bits of consecutive blocks lo..hi (checked by `run_check`) and moves their slots by
 * `sign` (+1 taken, -1 given back) blocks each; appends the slots that empty to `emptied` (mutex
 * held; the caller accounts for num_free). */
static Py_ssize_t run_flip(Allocator *a, long long lo, long long hi, int sign, Py_ssize_t *emptied) {
    Py_ssize_t nemptied = 0;
    for (Py_ssize_t s = (Py_ssize_t)(lo / a->bps); (long long)s * a->bps <= hi; s++) {
        Py_ssize_t first = s * a->bps, last = first + a->bps - 1;
        Py_ssize_t from = lo > first ? (Py_ssize_t)lo : first, to = hi < last ? (Py_ssize_t)hi : last;
        run_is(a, s, from, to, sign < 0 ? 0 : 1, 1);
        Py_ssize_t used = a->used[s], after = used + sign * (to - from + 1);
        slot_moves(a, s, used, after);
        if (!after && emptied != NULL)
            emptied[nemptied++] = s;
    }
    return nemptied;
}

/* `need` (1 .. num_free) blocks into `out`, fullest slots first (mutex held). */
static void alloc_locked(Allocator *a, Py_ssize_t need, PyObject **out) {
    Py_ssize_t bps = a->bps;
    a->num_free -= need;
    while (need) {
        Py_ssize_t u = bitsets_highest(&a->mask, 0); /* the fullest non-full slots */
        Py_ssize_t slot = bitsets_lowest(&a->buckets, u); /* the lowest of them */
        Py_ssize_t k = bps - u < need ? bps - u : need;
        take_lowest(a, slot, k, out);
        out += k;
        need -= k;
        slot_moves(a, slot, u, u + k);
    }
}

/* ---- argument conversion (no mutex) ---- */

/* The ids of a batch (any iterable of ints) as C values. */
typedef struct {
    PyObject *seq; /* PySequence_Fast of the batch: its items name bad ids in errors */
    long long *v;
    Py_ssize_t n;
    long long stack[STACK_IDS];
    Py_ssize_t overflow_at; /* -1, or the first item beyond a long long */
    Py_ssize_t neg_over, pos_over; /* -1, or the first item below / above a long long */
    int up, down;                  /* every id is the previous one plus one / minus one */
} Batch;

static void batch_fini(Batch *b) {
    if (b->v != b->stack)
        PyMem_Free(b->v);
    b->v = NULL;
    Py_CLEAR(b->seq);
}

/* An exact int that fits one digit (every block id below 2**30) without a call; else 0. */
static inline int small_int(PyObject *o, long long *out) {
    if (!PyLong_CheckExact(o))
        return 0;
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject *)o))
        return 0;
    *out = (long long)PyUnstable_Long_CompactValue((PyLongObject *)o);
    return 1;
#else
    Py_ssize_t size = Py_SIZE(o);
    if (size < -1 || size > 1)
        return 0;
    *out = size * (long long)((PyLongObject *)o)->ob_digit[0];
    return 1;
#endif
}

/* The batch `ids` as C values. With an allocator `a`, an id next to the previous one on the same
 * slot (a run, up or down) is recognized by its object being the allocator's own int for it
 * (`ints`, read without the mutex: a slot's table never changes once made), so the int object itself
 * is not read: batches alloc handed out are mostly such runs, and their int objects are cold. */
static int batch_init(Batch *b, PyObject *ids, Allocator *a) {
    b->v = b->stack;
    b->overflow_at = b->neg_over = b->pos_over = -1;
    b->up = b->down = 1;
    b->seq = PySequence_Fast(ids, "block ids must be an iterable of ints");
    if (b->seq == NULL)
        return -1;
    b->n = PySequence_Fast_GET_SIZE(b->seq);
    if (b->n > STACK_IDS) {
        b->v = PyMem_Malloc((size_t)b->n * sizeof(long long));
        if (b->v == NULL) {
            b->v = b->stack;
            Py_CLEAR(b->seq);
            PyErr_NoMemory();
            return -1;
        }
    }
    PyObject **items = PySequence_Fast_ITEMS(b->seq);
    long long *v = b->v, prev = 0;
    int up = 1, down = 1; /* locals: stores to v[] cannot alias them */
    PyObject **row = NULL; /* the allocator's ints of prev's slot (NULL: none to compare with) */
    Py_ssize_t k = 0;      /* prev's place in its slot */
    for (Py_ssize_t i = 0; i < b->n; i++) {
        PyObject *o = items[i];
        long long x;
        if (row != NULL && k + 1 < a->bps && row[k + 1] == o) {
            /* An ascending run of the allocator's own ints: as far as it goes on this slot, one
             * memcmp of the pointers (as alloc hands batches out, this is most of a batch). */
            Py_ssize_t m = b->n - i < a->bps - k - 1 ? b->n - i : a->bps - k - 1;
            if (m > 1 && memcmp(&items[i], &row[k + 1], (size_t)m * sizeof(PyObject *)) == 0) {
                for (Py_ssize_t j = 0; j < m; j++)
                    v[i + j] = prev + 1 + j;
                down = 0;
                prev += m;
                k += m;
                i += m - 1;
                continue;
            }
            x = prev + 1;
            k++;
        } else if (row != NULL && k > 0 && row[k - 1] == o) {
            x = prev - 1;
            k--;
        } else {
            int overflow = 0;
            if (!small_int(o, &x)) {
                up = down = 0;
                x = PyLong_AsLongLongAndOverflow(o, &overflow);
                if (x == -1 && PyErr_Occurred()) {
                    batch_fini(b);
                    return -1;
                }
            }
            if (overflow) { /* clamped: it sorts where it belongs, and is out of range */
                if (b->overflow_at < 0)
                    b->overflow_at = i;
                if (overflow < 0 && b->neg_over < 0)
                    b->neg_over = i;
                if (overflow > 0 && b->pos_over < 0)
                    b->pos_over = i;
                x = overflow > 0 ? LLONG_MAX : LLONG_MIN;
            }
            row = NULL;
            if (a != NULL && !overflow && x >= 0 && x < a->max_blocks) {
                Py_ssize_t slot = (Py_ssize_t)(x / a->bps);
                row = __atomic_load_n(&a->ints[slot], __ATOMIC_ACQUIRE);
                k = (Py_ssize_t)(x - (long long)slot * a->bps);
            }
        }
        if (i) {
            up &= (unsigned long long)x == (unsigned long long)prev + 1; /* no signed overflow */
            down &= (unsigned long long)x == (unsigned long long)prev - 1;
        }
        v[i] = prev = x;
    }
    b->up = up;
    b->down = down;
    return 0;
}

static int parse_count(PyObject *arg, Py_ssize_t *n) {
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (overflow)
        x = overflow > 0 ? LLONG_MAX : -1;
    *n = x > PY_SSIZE_T_MAX ? PY_SSIZE_T_MAX : (Py_ssize_t)x;
    return 0;
}

static int parse_slot(Allocator *a, PyObject *arg, Py_ssize_t *slot) {
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (overflow || x < 0 || x >= a->max_slots) {
        PyErr_Format(PyExc_ValueError, "slot %S is out of range (0..%zd)", arg, a->max_slots - 1);
        return -1;
    }
    *slot = (Py_ssize_t)x;
    return 0;
}

/* A list of `n` new references (stolen), or NULL (the references are released). */
static PyObject *list_of(PyObject **items, Py_ssize_t n) {
    PyObject *list = PyList_New(n);
    if (list == NULL) {
        for (Py_ssize_t i = 0; i < n; i++)
            Py_DECREF(items[i]);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        PyList_SET_ITEM(list, i, items[i]);
    return list;
}

static PyObject *list_of_ssize(const Py_ssize_t *values, Py_ssize_t n) {
    PyObject *list = PyList_New(n);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = PyLong_FromSsize_t(values[i]);
        if (x == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, x);
    }
    return list;
}

/* ---- construction ---- */

static int allocator_alloc_arrays(Allocator *a) {
    size_t slots = (size_t)a->max_slots;
    a->free_bits = PyMem_Calloc(slots * (size_t)a->wps, sizeof(uint64_t));
    a->used = PyMem_Calloc(slots, sizeof(Py_ssize_t));
    a->pending = PyMem_Calloc(slots, sizeof(Py_ssize_t));
    a->touched = PyMem_Calloc(slots, sizeof(Py_ssize_t));
    a->mapped = PyMem_Calloc(slots, 1);
    a->ints = PyMem_Calloc(slots, sizeof(PyObject **));
    if (!a->free_bits || !a->used || !a->pending || !a->touched || !a->mapped || !a->ints)
        return -1;
    return 0;
}

static int allocator_setup(Allocator *a, Py_ssize_t bps, Py_ssize_t max_slots) {
    a->bps = bps;
    a->max_slots = max_slots;
    a->max_blocks = bps * max_slots;
    a->wps = (bps + 63) / 64;
    if (mutex_init(&a->mutex) < 0 || allocator_alloc_arrays(a) < 0 || bitsets_init(&a->buckets, bps, max_slots) < 0 ||
        bitsets_init(&a->mask, 1, bps) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static PyObject *Allocator_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"blocks_per_slot", "max_slots", NULL};
    Py_ssize_t bps, max_slots;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nn:BlockAllocator", kwlist, &bps, &max_slots))
        return NULL;
    if (bps < 1 || max_slots < 1) {
        PyErr_Format(PyExc_ValueError, "blocks_per_slot=%zd and max_slots=%zd must be positive", bps, max_slots);
        return NULL;
    }
    if (bps > ((Py_ssize_t)1 << 40) / max_slots) {
        PyErr_Format(PyExc_ValueError, "blocks_per_slot=%zd and max_slots=%zd: more than 2**40 blocks", bps, max_slots);
        return NULL;
    }
    Allocator *a = (Allocator *)type->tp_alloc(type, 0);
    if (a == NULL)
        return NULL;
    if (allocator_setup(a, bps, max_slots) < 0) {
        Py_DECREF(a);
        return NULL;
    }
    return (PyObject *)a;
}

static void allocator_release_arrays(Allocator *a) {
    if (a->ints != NULL) {
        for (Py_ssize_t s = 0; s < a->max_slots; s++) {
            if (a->ints[s] != NULL) {
                for (Py_ssize_t i = 0; i < a->bps; i++)
                    Py_XDECREF(a->ints[s][i]);
                PyMem_Free(a->ints[s]);
            }
        }
    }
    PyMem_Free(a->ints);
    PyMem_Free(a->free_bits);
    PyMem_Free(a->used);
    PyMem_Free(a->pending);
    PyMem_Free(a->touched);
    PyMem_Free(a->mapped);
    a->ints = NULL;
    a->free_bits = NULL;
    a->used = a->pending = a->touched = NULL;
    a->mapped = NULL;
    bitsets_free(&a->buckets);
    bitsets_free(&a->mask);
}

static int Allocator_traverse(Allocator *a, visitproc visit, void *arg) {
    Py_VISIT(a->wake); /* the id objects are ints: they hold no reference */
    Py_VISIT(a->first_take);
    return 0;
}

static int Allocator_clear(Allocator *a) {
    Py_CLEAR(a->wake);
    Py_CLEAR(a->first_take);
    return 0;
}

static void Allocator_dealloc(Allocator *a) {
    PyTypeObject *type = Py_TYPE(a);
    PyObject_GC_UnTrack(a);
    Allocator_clear(a);
    allocator_release_arrays(a);
    mutex_fini(&a->mutex);
    type->tp_free((PyObject *)a);
}

/* ---- counts ---- */

static PyObject *Allocator_get_num_free_blocks(Allocator *a, PyObject *Py_UNUSED(ignored)) {
    LOCK(a);
    Py_ssize_t n = a->num_free;
    UNLOCK(a);
    return PyLong_FromSsize_t(n);
}

static PyObject *Allocator_get_num_used_blocks(Allocator *a, PyObject *Py_UNUSED(ignored)) {
    LOCK(a);
    Py_ssize_t n = a->num_mapped * a->bps - a->num_free;
    UNLOCK(a);
    return PyLong_FromSsize_t(n);
}

static PyObject *Allocator_get_num_mapped_slots(Allocator *a, PyObject *Py_UNUSED(ignored)) {
    LOCK(a);
    Py_ssize_t n = a->num_mapped;
    UNLOCK(a);
    return PyLong_FromSsize_t(n);
}

static PyObject *Allocator_counts(Allocator *a, PyObject *Py_UNUSED(ignored)) {
    LOCK(a);
    Py_ssize_t free = a->num_free, used = a->num_mapped * a->bps - a->num_free, mapped = a->num_mapped;
    Py_ssize_t busy = a->num_mapped - a->num_empty;
    UNLOCK(a);
    return Py_BuildValue("(nnnn)", free, used, mapped, busy);
}

static PyObject *Allocator_is_mapped(Allocator *a, PyObject *arg) {
    Py_ssize_t slot;
    if (parse_slot(a, arg, &slot) < 0)
        return NULL;
    LOCK(a);
    int mapped = a->mapped[slot];
    UNLOCK(a);
    return PyBool_FromLong(mapped);
}

/* ---- slot queries (off the hot path: a buffer of max_slots) ---- */

static PyObject *Allocator_get_empty_slots(Allocator *a, PyObject *Py_UNUSED(ignored)) {
    Py_ssize_t *out = PyMem_Malloc((size_t)a->max_slots * sizeof(Py_ssize_t));
    if (out == NULL)
        return PyErr_NoMemory();
    Py_ssize_t n = 0;
    LOCK(a);
    for (Py_ssize_t s = a->max_slots - 1; s >= 0; s--)
        if (a->mapped[s] && a->used[s] == 0)
            out[n++] = s;
    UNLOCK(a);
    PyObject *list = list_of_ssize(out, n);
    PyMem_Free(out);
    return list;
}

static PyObject *Allocator_get_unmapped_slots(Allocator *a, PyObject *arg) {
    Py_ssize_t want;
    if (parse_count(arg, &want) < 0)
        return NULL;
    if (want <= 0)
        return PyList_New(0);
    if (want > a->max_slots)
        want = a->max_slots;
    Py_ssize_t *out = PyMem_Malloc((size_t)want * sizeof(Py_ssize_t));
    if (out == NULL)
        return PyErr_NoMemory();
    Py_ssize_t n = 0;
    LOCK(a);
    for (Py_ssize_t s = 0; s < a->max_slots && n < want; s++)
        if (!a->mapped[s])
            out[n++] = s;
    UNLOCK(a);
    PyObject *list = list_of_ssize(out, n);
    PyMem_Free(out);
    return list;
}

typedef struct {
    Py_ssize_t slot, used;
} SlotUsage;

static int usage_order(const void *x, const void *y) {
    const SlotUsage *p = x, *q = y;
    if (p->used != q->used)
        return p->used > q->used ? -1 : 1;
    return p->slot < q->slot ? -1 : p->slot > q->slot;
}

static PyObject *Allocator_get_slot_usage(Allocator *a, PyObject *Py_UNUSED(ignored)) {
    SlotUsage *out = PyMem_Malloc((size_t)a->max_slots * sizeof(SlotUsage));
    if (out == NULL)
        return PyErr_NoMemory();
    Py_ssize_t n = 0;
    LOCK(a);
    for (Py_ssize_t s = 0; s < a->max_slots; s++)
        if (a->mapped[s]) {
            out[n].slot = s;
            out[n++].used = a->used[s];
        }
    UNLOCK(a);
    qsort(out, (size_t)n, sizeof(SlotUsage), usage_order);
    PyObject *list = PyList_New(n);
    for (Py_ssize_t i = 0; list != NULL && i < n; i++) {
        PyObject *pair = Py_BuildValue("(nn)", out[i].slot, out[i].used);
        if (pair == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, pair);
    }
    PyMem_Free(out);
    return list;
}

static PyObject *Allocator_get_used_blocks(Allocator *a, PyObject *arg) {
    Py_ssize_t slot;
    if (parse_slot(a, arg, &slot) < 0)
        return NULL;
    PyObject **out = PyMem_Malloc((size_t)a->bps * sizeof(PyObject *));
    if (out == NULL)
        return PyErr_NoMemory();
    Py_ssize_t n = 0;
    LOCK(a);
    if (a->mapped[slot]) {
        const uint64_t *fb = a->free_bits + slot * a->wps;
        for (Py_ssize_t i = 0; i < a->bps; i++)
            if (!((fb[i >> 6] >> (i & 63)) & 1)) {
                out[n] = a->ints[slot][i];
                Py_INCREF(out[n++]);
            }
    }
    UNLOCK(a);
    PyObject *list = list_of(out, n);
    PyMem_Free(out);
    return list;
}

/* ---- slots ---- */

static PyObject *Allocator_add_slot(Allocator *a, PyObject *arg) {
    Py_ssize_t slot;
    if (parse_slot(a, arg, &slot) < 0)
        return NULL;
    /* The slot's id objects, made before the mutex is taken (the first time the slot is mapped). */
    PyObject **ints = NULL;
    if (__atomic_load_n(&a->ints[slot], __ATOMIC_ACQUIRE) == NULL) {
        ints = PyMem_Calloc((size_t)a->bps, sizeof(PyObject *));
        if (ints == NULL)
            return PyErr_NoMemory();
        for (Py_ssize_t i = 0; i < a->bps; i++) {
            ints[i] = PyLong_FromSsize_t(slot * a->bps + i);
            if (ints[i] == NULL) {
                for (Py_ssize_t j = 0; j < i; j++)
                    Py_DECREF(ints[j]);
                PyMem_Free(ints);
                return NULL;
            }
        }
    }
    LOCK(a);
    int was_mapped = a->mapped[slot];
    if (!was_mapped) {
        if (a->ints[slot] == NULL) {
            __atomic_store_n(&a->ints[slot], ints, __ATOMIC_RELEASE);
            ints = NULL;
        }
        uint64_t *fb = a->free_bits + slot * a->wps;
        for (Py_ssize_t w = 0; w < a->wps; w++)
            fb[w] = ~(uint64_t)0;
        if (a->bps & 63)
            fb[a->wps - 1] = ((uint64_t)1 << (a->bps & 63)) - 1;
        a->mapped[slot] = 1;
        a->used[slot] = 0;
        bucket_add(a, 0, slot);
        a->num_free += a->bps;
        a->num_mapped++;
    }
    UNLOCK(a);
    if (ints != NULL) { /* another thread made them first */
        for (Py_ssize_t i = 0; i < a->bps; i++)
            Py_DECREF(ints[i]);
        PyMem_Free(ints);
    }
    if (was_mapped) {
        PyErr_Format(PyExc_ValueError, "slot %zd is already mapped", slot);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Unmaps empty, mapped `slot` (mutex held). */
static void remove_locked(Allocator *a, Py_ssize_t slot) {
    bucket_remove(a, 0, slot);
    memset(a->free_bits + slot * a->wps, 0, (size_t)a->wps * sizeof(uint64_t));
    a->mapped[slot] = 0;
    a->num_free -= a->bps;
    a->num_mapped--;
}

static PyObject *Allocator_remove_slot(Allocator *a, PyObject *arg) {
    Py_ssize_t slot;
    if (parse_slot(a, arg, &slot) < 0)
        return NULL;
    LOCK(a);
    int mapped = a->mapped[slot];
    Py_ssize_t used = a->used[slot];
    if (mapped && !used)
        remove_locked(a, slot);
    UNLOCK(a);
    if (!mapped) {
        PyErr_Format(PyExc_ValueError, "slot %zd is not mapped", slot);
        return NULL;
    }
    if (used) {
        PyErr_Format(PyExc_ValueError, "slot %zd still has %zd blocks in use", slot, used);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Allocator_remove_empty_slots(Allocator *a, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t most = PY_SSIZE_T_MAX;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "remove_empty_slots() takes at most one argument");
        return NULL;
    }
    if (nargs == 1 && args[0] != Py_None && parse_count(args[0], &most) < 0)
        return NULL;
    Py_ssize_t *out = PyMem_Malloc((size_t)a->max_slots * sizeof(Py_ssize_t));
    if (out == NULL)
        return PyErr_NoMemory();
    Py_ssize_t n = 0;
    LOCK(a);
    for (Py_ssize_t s = a->max_slots - 1; s >= 0 && n < most; s--)
        if (a->mapped[s] && a->used[s] == 0) {
            remove_locked(a, s);
            out[n++] = s;
        }
    UNLOCK(a);
    PyObject *list = list_of_ssize(out, n);
    PyMem_Free(out);
    return list;
}

static PyObject *Allocator_reset(Allocator *a, PyObject *Py_UNUSED(ignored)) {
    LOCK(a);
    for (Py_ssize_t s = 0; s < a->max_slots; s++) {
        if (a->mapped[s]) {
            if (a->used[s] < a->bps)
                bucket_remove(a, a->used[s], s);
            a->used[s] = 0;
            a->mapped[s] = 0;
        }
    }
    memset(a->free_bits, 0, (size_t)(a->max_slots * a->wps) * sizeof(uint64_t));
    a->num_free = a->num_mapped = 0;
    UNLOCK(a);
    Py_RETURN_NONE;
}

/* ---- the first-take hook ---- */

/* Blocks were just handed out (mutex held): the armed hook, disarmed, to be called once the mutex is
 * released with `*used`, the blocks in use now (NULL if none is armed). */
static inline PyObject *first_take_locked(Allocator *a, Py_ssize_t *used) {
    PyObject *hook = a->first_take;
    if (hook != NULL) {
        a->first_take = NULL; /* its reference passes to the caller */
        *used = a->num_mapped * a->bps - a->num_free;
    }
    return hook;
}

/* Call a hook taken by `first_take_locked` (mutex released): the blocks are handed out, so an error
 * here must not lose them. */
static void call_first_take(PyObject *hook, Py_ssize_t used) {
    PyObject *arg = PyLong_FromSsize_t(used);
    PyObject *r = arg != NULL ? PyObject_CallOneArg(hook, arg) : NULL;
    if (r == NULL)
        PyErr_WriteUnraisable(hook);
    Py_XDECREF(r);
    Py_XDECREF(arg);
    Py_DECREF(hook);
}

static PyObject *Allocator_arm_first_take(Allocator *a, PyObject *hook) {
    if (hook != Py_None && !PyCallable_Check(hook)) {
        PyErr_SetString(PyExc_TypeError, "the first-take hook must be callable or None");
        return NULL;
    }
    PyObject *armed = hook == Py_None ? NULL : hook;
    Py_XINCREF(armed);
    LOCK(a);
    PyObject *old = a->first_take;
    a->first_take = armed;
    UNLOCK(a);
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

/* ---- alloc ---- */

/* Up to `n` ids (exact: exactly n or None; and only while the gate is open). */
static PyObject *do_alloc(Allocator *a, PyObject *arg, int exact) {
    Py_ssize_t n;
    if (parse_count(arg, &n) < 0)
        return NULL;
    if (n <= 0 && !exact)
        return PyList_New(0);
    if (exact && n > a->max_blocks)
        Py_RETURN_NONE; /* never that many */
    Py_ssize_t cap = n > a->max_blocks ? a->max_blocks : n;
    PyObject *list = PyList_New(cap > 0 ? cap : 0); /* made before the mutex; filled under it */
    if (list == NULL)
        return NULL;
    Py_ssize_t got = 0, used = 0;
    PyObject *wake = NULL, *first_take = NULL;
    int refused = 0;
    LOCK(a);
    if (exact) {
        if (a->paused || a->closed || n < 0 || a->num_free < n)
            refused = 1;
        else
            got = n;
    } else {
        got = cap < a->num_free ? cap : a->num_free;
    }
    if (got > 0) {
        alloc_locked(a, got, PySequence_Fast_ITEMS(list));
        first_take = first_take_locked(a, &used);
        if (exact && a->num_free < a->low_watermark && a->wake != NULL && !a->wake_pending) {
            a->wake_pending = 1;
            wake = a->wake;
            Py_INCREF(wake);
        }
    }
    UNLOCK(a);
    if (wake != NULL) {
        /* Growth's wake-up: the ids are taken, so an error here must not lose them. */
        PyObject *r = PyObject_CallNoArgs(wake);
        if (r == NULL)
            PyErr_WriteUnraisable(wake);
        Py_XDECREF(r);
        Py_DECREF(wake);
    }
    if (first_take != NULL)
        call_first_take(first_take, used);
    if (refused) {
        Py_DECREF(list);
        Py_RETURN_NONE;
    }
    if (got < cap) { /* fewer were free: the list shrinks to what it holds (its tail is still NULL) */
        PyObject *items = PyList_GetSlice(list, 0, got);
        Py_DECREF(list);
        return items;
    }
    return list;
}

static PyObject *Allocator_alloc(Allocator *a, PyObject *arg) { return do_alloc(a, arg, 0); }

static PyObject *Allocator_alloc_exact(Allocator *a, PyObject *arg) { return do_alloc(a, arg, 1); }

/* ---- free ---- */

enum { OK = 0, NOT_MAPPED, NOT_IN_USE, OUT_OF_RANGE, GIVEN_TWICE, ALREADY_IN_USE };

static PyObject *Allocator_free(Allocator *a, PyObject *ids) {
    Batch b;
    if (batch_init(&b, ids, a) < 0)
        return NULL;
    Py_ssize_t n = b.n, bps = a->bps, nt = 0, nemptied = 0, bad = -1;
    const long long *v = b.v;
    int error = OK;
    /* The emptied slots (at most one per id), made before the mutex is taken. */
    Py_ssize_t emptied_stack[STACK_IDS];
    Py_ssize_t *emptied = n > STACK_IDS ? PyMem_Malloc((size_t)n * sizeof(Py_ssize_t)) : emptied_stack;
    if (emptied == NULL) {
        batch_fini(&b);
        return PyErr_NoMemory();
    }
    /* The slot of the previous id (its first block `base`, `cnt` ids of the batch on it so far) and
     * the free-bit word it fell in (index `wi`, its bits `orig` before, `acc` those the batch sets):
     * a batch of ids close together costs no division and no memory round trip per id. */
    Py_ssize_t slot = -1, cnt = 0, wi = -1;
    long long base = 0;
    uint64_t orig = 0, acc = 0;
    int done = 0;
    LOCK(a);
    if (n && (b.up || b.down)) {
        /* The common case: a run of consecutive ids (as alloc hands them out; vLLM frees a request's
         * tail first) on mapped slots, all in use: checked and given back word by word. Anything else
         * goes the general way below, which names the bad block. */
        long long lo = b.up ? v[0] : v[n - 1], hi = b.up ? v[n - 1] : v[0];
        if (run_check(a, lo, hi, 0)) {
            nemptied = run_flip(a, lo, hi, -1, emptied);
            a->num_free += n;
            done = 1;
        }
    }
    /* Check the batch in its order, setting each block's free bit: a block already free (or given
     * earlier in the batch) is refused, and the bits set so far are cleared again. */
    for (Py_ssize_t i = 0; i < n && !done; i++) {
        long long x = v[i];
        if (slot < 0 || x < base || x - base >= bps) { /* another slot than the previous id's */
            if (wi >= 0)
                a->free_bits[wi] = orig | acc;
            if (slot >= 0 && a->pending[slot] == 0)
                a->touched[nt++] = slot;
            if (slot >= 0)
                a->pending[slot] += cnt;
            wi = -1;
            cnt = 0;
            slot = -1;
            if (i == b.overflow_at || x < 0 || x >= a->max_blocks || !a->mapped[x / bps]) {
                error = NOT_MAPPED;
                bad = i;
                break;
            }
            slot = (Py_ssize_t)(x / bps);
            base = (long long)slot * bps;
        }
        Py_ssize_t k = (Py_ssize_t)(x - base), w = slot * a->wps + (k >> 6);
        uint64_t bit = (uint64_t)1 << (k & 63);
        if (w != wi) {
            if (wi >= 0)
                a->free_bits[wi] = orig | acc;
            wi = w;
            orig = a->free_bits[w];
            acc = 0;
        }
        if ((orig | acc) & bit) {
            error = NOT_IN_USE;
            bad = i;
            break;
        }
        acc |= bit;
        cnt++;
    }
    if (slot >= 0) { /* the last slot's word and count (after a refused id too: the undo reads them) */
        a->free_bits[wi] = orig | acc;
        if (a->pending[slot] == 0 && cnt)
            a->touched[nt++] = slot;
        a->pending[slot] += cnt;
    }
    if (error != OK) {
        for (Py_ssize_t i = 0; i < bad; i++) {
            Py_ssize_t s = (Py_ssize_t)(v[i] / bps), k = (Py_ssize_t)(v[i] - (long long)s * bps);
            a->free_bits[s * a->wps + (k >> 6)] &= ~((uint64_t)1 << (k & 63));
        }
        for (Py_ssize_t t = 0; t < nt; t++)
            a->pending[a->touched[t]] = 0;
    } else if (!done) {
        for (Py_ssize_t t = 0; t < nt; t++) {
            Py_ssize_t s = a->touched[t], used = a->used[s], left = used - a->pending[s];
            a->pending[s] = 0;
            slot_moves(a, s, used, left);
            if (!left)
                emptied[nemptied++] = s;
        }
        a->num_free += n;
    }
    UNLOCK(a);
    PyObject *result = NULL;
    if (error != OK) {
        PyObject *item = PySequence_Fast_ITEMS(b.seq)[bad];
        PyErr_Format(PyExc_ValueError,
                     error == NOT_MAPPED ? "block %S is not on a mapped slot" : "block %S is not in use (freed twice?)",
                     item);
    } else {
        for (Py_ssize_t i = 1; i < nemptied; i++) { /* ascending (a batch empties few slots) */
            Py_ssize_t x = emptied[i], j = i;
            for (; j > 0 && emptied[j - 1] > x; j--)
                emptied[j] = emptied[j - 1];
            emptied[j] = x;
        }
        result = list_of_ssize(emptied, nemptied);
    }
    if (emptied != emptied_stack)
        PyMem_Free(emptied);
    batch_fini(&b);
    return result;
}

/* ---- take ---- */

static int compare_ll(const void *x, const void *y) {
    long long p = *(const long long *)x, q = *(const long long *)y;
    return (p > q) - (p < q);
}

/* take: `gated` refuses (returns 0) while paused or closed. 1 taken, 0 refused, -1 error set. */
static int do_take(Allocator *a, PyObject *ids, int gated) {
    Batch b;
    if (batch_init(&b, ids, a) < 0)
        return -1;
    Py_ssize_t n = b.n, bps = a->bps;
    long long *v = b.v;
    int ascending = 1;
    for (Py_ssize_t i = 1; i < n && ascending; i++)
        ascending = v[i - 1] <= v[i];
    if (!ascending)
        qsort(v, (size_t)n, sizeof(long long), compare_ll);
    int error = OK, refused = 0, done = 0;
    long long bad = 0;
    PyObject *first_take = NULL;
    Py_ssize_t used = 0;
    if (n && v[0] < 0) {
        error = OUT_OF_RANGE;
        bad = v[0];
    } else if (n && v[n - 1] >= a->max_blocks) {
        error = OUT_OF_RANGE;
        bad = v[n - 1];
    }
    if (gated || (n && error == OK)) {
        LOCK(a);
        if (gated && (a->paused || a->closed)) {
            refused = 1; /* the gate first: a sleeping cache says so whatever the ids */
            error = OK;
        }
        int consecutive = n && !refused && error == OK;
        for (Py_ssize_t i = 1; i < n && consecutive; i++)
            consecutive = v[i] == v[i - 1] + 1;
        if (consecutive) {
            /* The common case: consecutive free ids (a free queue's run): checked and taken word by word. */
            if (run_check(a, v[0], v[n - 1], 1)) {
                run_flip(a, v[0], v[n - 1], 1, NULL);
                a->num_free -= n;
                done = 1;
            }
        }
        /* Check every run of ids on one slot, lowest first, before taking any. */
        for (Py_ssize_t i = 0; i < n && !refused && !done && error == OK;) {
            Py_ssize_t slot = (Py_ssize_t)(v[i] / bps), j = i;
            long long end = (long long)(slot + 1) * bps;
            while (j < n && v[j] < end)
                j++;
            if (!a->mapped[slot]) {
                error = NOT_MAPPED;
                bad = v[i];
                break;
            }
            const uint64_t *fb = a->free_bits + slot * a->wps;
            for (Py_ssize_t m = i; m < j; m++) {
                Py_ssize_t k = (Py_ssize_t)(v[m] - (long long)slot * bps);
                if (m > i && v[m] == v[m - 1]) {
                    error = GIVEN_TWICE;
                } else if (!((fb[k >> 6] >> (k & 63)) & 1)) {
                    error = ALREADY_IN_USE;
                }
                if (error != OK) {
                    bad = v[m];
                    break;
                }
            }
            i = j;
        }
        if (!refused && !done && error == OK) {
            for (Py_ssize_t i = 0; i < n;) {
                Py_ssize_t slot = (Py_ssize_t)(v[i] / bps), j = i;
                uint64_t *fb = a->free_bits + slot * a->wps;
                long long end = (long long)(slot + 1) * bps;
                for (; j < n && v[j] < end; j++) {
                    Py_ssize_t k = (Py_ssize_t)(v[j] - (long long)slot * bps);
                    fb[k >> 6] &= ~((uint64_t)1 << (k & 63));
                }
                slot_moves(a, slot, a->used[slot], a->used[slot] + (j - i));
                i = j;
            }
            a->num_free -= n;
            done = 1;
        }
        if (done && n)
            first_take = first_take_locked(a, &used);
        UNLOCK(a);
    }
    if (first_take != NULL)
        call_first_take(first_take, used);
    PyObject **items = PySequence_Fast_ITEMS(b.seq);
    if (error == OUT_OF_RANGE && bad == LLONG_MIN && b.neg_over >= 0) { /* beyond a long long: named as given */
        PyErr_Format(PyExc_ValueError, "block %S is out of range (0..%zd)", items[b.neg_over], a->max_blocks - 1);
    } else if (error == OUT_OF_RANGE && bad == LLONG_MAX && b.pos_over >= 0) {
        PyErr_Format(PyExc_ValueError, "block %S is out of range (0..%zd)", items[b.pos_over], a->max_blocks - 1);
    } else if (error == OUT_OF_RANGE) {
        PyErr_Format(PyExc_ValueError, "block %lld is out of range (0..%zd)", bad, a->max_blocks - 1);
    } else if (error == NOT_MAPPED) {
        PyErr_Format(PyExc_ValueError, "block %lld is not on a mapped slot", bad);
    } else if (error == GIVEN_TWICE) {
        PyErr_Format(PyExc_ValueError, "block %lld is given twice", bad);
    } else if (error == ALREADY_IN_USE) {
        PyErr_Format(PyExc_ValueError, "block %lld is already in use", bad);
    }
    batch_fini(&b);
    return error != OK ? -1 : !refused;
}

static PyObject *Allocator_take(Allocator *a, PyObject *ids) {
    if (do_take(a, ids, 0) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Allocator_try_take(Allocator *a, PyObject *ids) {
    int r = do_take(a, ids, 1);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

/* ---- growth's wake-up ---- */

static PyObject *Allocator_set_low_watermark(Allocator *a, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_low_watermark(low, wake) takes two arguments");
        return NULL;
    }
    Py_ssize_t low;
    if (parse_count(args[0], &low) < 0)
        return NULL;
    PyObject *wake = args[1] == Py_None ? NULL : args[1];
    if (wake != NULL && !PyCallable_Check(wake)) {
        PyErr_SetString(PyExc_TypeError, "wake must be callable or None");
        return NULL;
    }
    Py_XINCREF(wake);
    LOCK(a);
    PyObject *old = a->wake;
    a->wake = wake;
    a->low_watermark = low;
    UNLOCK(a);
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

/* ---- copies (tests drain a copy to see the order alloc would hand ids out in) ---- */

static PyObject *Allocator_copy(Allocator *a, PyObject *Py_UNUSED(ignored)) {
    Allocator *c = (Allocator *)AllocatorType.tp_alloc(&AllocatorType, 0);
    if (c == NULL)
        return NULL;
    if (allocator_setup(c, a->bps, a->max_slots) < 0) {
        Py_DECREF(c);
        return NULL;
    }
    PyObject ***ints = PyMem_Calloc((size_t)a->max_slots, sizeof(PyObject **));
    int failed = ints == NULL;
    for (Py_ssize_t s = 0; s < a->max_slots && !failed; s++) {
        if (__atomic_load_n(&a->ints[s], __ATOMIC_ACQUIRE) == NULL)
            continue;
        ints[s] = PyMem_Malloc((size_t)a->bps * sizeof(PyObject *));
        failed = ints[s] == NULL;
        for (Py_ssize_t i = 0; i < a->bps && !failed; i++) {
            ints[s][i] = a->ints[s][i];
            Py_INCREF(ints[s][i]);
        }
    }
    if (failed) {
        for (Py_ssize_t s = 0; ints != NULL && s < a->max_slots; s++)
            if (ints[s] != NULL) {
                for (Py_ssize_t i = 0; i < a->bps; i++)
                    Py_XDECREF(ints[s][i]);
                PyMem_Free(ints[s]);
            }
        PyMem_Free(ints);
        Py_DECREF(c);
        return PyErr_NoMemory();
    }
    PyMem_Free(c->ints);
    c->ints = ints;
    LOCK(a);
    size_t slots = (size_t)a->max_slots;
    memcpy(c->free_bits, a->free_bits, slots * (size_t)a->wps * sizeof(uint64_t));
    memcpy(c->used, a->used, slots * sizeof(Py_ssize_t));
    memcpy(c->mapped, a->mapped, slots);
    for (int l = 0; l < a->buckets.depth; l++)
        memcpy(c->buckets.words[l], a->buckets.words[l], (size_t)(a->bps * a->buckets.nwords[l]) * sizeof(uint64_t));
    for (int l = 0; l < a->mask.depth; l++)
        memcpy(c->mask.words[l], a->mask.words[l], (size_t)a->mask.nwords[l] * sizeof(uint64_t));
    c->num_free = a->num_free;
    c->num_mapped = a->num_mapped;
    c->num_empty = a->num_empty;
    c->paused = a->paused;
    c->closed = a->closed;
    c->low_watermark = a->low_watermark;
    UNLOCK(a);
    return (PyObject *)c;
}

static PyObject *Allocator_deepcopy(Allocator *a, PyObject *Py_UNUSED(memo)) { return Allocator_copy(a, NULL); }

/* ---- the invariants (for tests) ---- */

static int check_bitsets(const BitSets *bs, Py_ssize_t set) {
    for (int l = 0; l + 1 < bs->depth; l++)
        for (Py_ssize_t i = 0; i < bs->nwords[l]; i++) {
            int nonzero = bs->words[l][set * bs->nwords[l] + i] != 0;
            int summary = (int)((bs->words[l + 1][set * bs->nwords[l + 1] + (i >> 6)] >> (i & 63)) & 1);
            if (nonzero != summary)
                return -1;
        }
    return 0;
}

static PyObject *Allocator_check(Allocator *a, PyObject *Py_UNUSED(ignored)) {
    char message[200] = "";
    Py_ssize_t bps = a->bps, free_total = 0, mapped_total = 0, empty_total = 0;
    LOCK(a);
    for (Py_ssize_t s = 0; s < a->max_slots && !message[0]; s++) {
        const uint64_t *fb = a->free_bits + s * a->wps;
        Py_ssize_t nfree = 0;
        for (Py_ssize_t w = 0; w < a->wps; w++)
            nfree += __builtin_popcountll(fb[w]);
        if ((bps & 63) && (fb[a->wps - 1] >> (bps & 63)))
            snprintf(message, sizeof message, "slot %zd has free bits past its last block", s);
        else if (a->pending[s])
            snprintf(message, sizeof message, "slot %zd has a pending count between calls", s);
        else if (!a->mapped[s] && (nfree || a->used[s]))
            snprintf(message, sizeof message, "unmapped slot %zd has free blocks or blocks in use", s);
        else if (a->mapped[s] && a->used[s] + nfree != bps)
            snprintf(message, sizeof message, "slot %zd: %zd in use + %zd free != %zd", s, a->used[s], nfree, bps);
        for (Py_ssize_t u = 0; u < bps && !message[0]; u++) {
            int member = bitsets_has(&a->buckets, u, s);
            if (member != (a->mapped[s] && a->used[s] == u))
                snprintf(message, sizeof message, "slot %zd is %s bucket %zd", s, member ? "wrongly in" : "not in", u);
        }
        free_total += nfree;
        mapped_total += a->mapped[s];
        empty_total += a->mapped[s] && a->used[s] == 0;
    }
    for (Py_ssize_t u = 0; u < bps && !message[0]; u++) {
        if (bitsets_has(&a->mask, 0, u) != (bitsets_lowest(&a->buckets, u) >= 0))
            snprintf(message, sizeof message, "the mask's bit %zd disagrees with bucket %zd", u, u);
        else if (check_bitsets(&a->buckets, u) < 0)
            snprintf(message, sizeof message, "bucket %zd's summary levels disagree with its slots", u);
    }
    if (!message[0] && check_bitsets(&a->mask, 0) < 0)
        snprintf(message, sizeof message, "the mask's summary levels disagree with it");
    if (!message[0] && (free_total != a->num_free || mapped_total != a->num_mapped || empty_total != a->num_empty))
        snprintf(message, sizeof message, "counts: free %zd (counted %zd), mapped %zd (%zd), empty %zd (%zd)",
                 a->num_free, free_total, a->num_mapped, mapped_total, a->num_empty, empty_total);
    UNLOCK(a);
    if (message[0]) {
        PyErr_SetString(PyExc_AssertionError, message);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---- flags ---- */

static PyObject *get_flag(Allocator *a, void *offset) {
    LOCK(a);
    int value = *((char *)a + (size_t)offset);
    UNLOCK(a);
    return PyBool_FromLong(value);
}

static int set_flag(Allocator *a, PyObject *value, void *offset) {
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete this flag");
        return -1;
    }
    int truth = PyObject_IsTrue(value);
    if (truth < 0)
        return -1;
    LOCK(a);
    *((char *)a + (size_t)offset) = (char)truth;
    UNLOCK(a);
    return 0;
}

static PyGetSetDef Allocator_getset[] = {
    {"paused", (getter)get_flag, (setter)set_flag,
     "While True, `alloc_exact` returns None and `try_take` False (the cache sleeps).",
     (void *)offsetof(Allocator, paused)},
    {"closed", (getter)get_flag, (setter)set_flag,
     "While True, `alloc_exact` returns None and `try_take` False (the cache is closed).",
     (void *)offsetof(Allocator, closed)},
    {"wake_pending", (getter)get_flag, (setter)set_flag,
     "True once `alloc_exact` called `wake`; no further call until it is set False again.",
     (void *)offsetof(Allocator, wake_pending)},
    {NULL},
};

static PyMemberDef Allocator_members[] = {
    {"blocks_per_slot", T_PYSSIZET, offsetof(Allocator, bps), READONLY, "Blocks in one page slot."},
    {"max_slots", T_PYSSIZET, offsetof(Allocator, max_slots), READONLY, "Page slots in the virtual capacity."},
    {"max_blocks", T_PYSSIZET, offsetof(Allocator, max_blocks), READONLY, "blocks_per_slot * max_slots."},
    {NULL},
};

static PyMethodDef Allocator_methods[] = {
    {"get_num_free_blocks", (PyCFunction)Allocator_get_num_free_blocks, METH_NOARGS,
     "get_num_free_blocks() -> int\n\nFree blocks on mapped slots."},
    {"get_num_used_blocks", (PyCFunction)Allocator_get_num_used_blocks, METH_NOARGS,
     "get_num_used_blocks() -> int\n\nBlocks in use."},
    {"get_num_mapped_slots", (PyCFunction)Allocator_get_num_mapped_slots, METH_NOARGS,
     "get_num_mapped_slots() -> int\n\nMapped slots."},
    {"counts", (PyCFunction)Allocator_counts, METH_NOARGS,
     "counts() -> tuple[int, int, int, int]\n\n(free blocks, blocks in use, mapped slots, mapped slots with a "
     "block in use), read at one instant."},
    {"is_mapped", (PyCFunction)Allocator_is_mapped, METH_O,
     "is_mapped(slot) -> bool\n\nWhether `slot` is mapped.\n\nRaises:\n    ValueError: `slot` is out of range."},
    {"get_empty_slots", (PyCFunction)Allocator_get_empty_slots, METH_NOARGS,
     "get_empty_slots() -> list[int]\n\nMapped slots with no block in use, highest first (the best ones to give "
     "back)."},
    {"get_slot_usage", (PyCFunction)Allocator_get_slot_usage, METH_NOARGS,
     "get_slot_usage() -> list[tuple[int, int]]\n\n(slot, blocks in use) of every mapped slot, fullest first, "
     "lowest slot first among equals: the order `alloc` fills them in."},
    {"get_used_blocks", (PyCFunction)Allocator_get_used_blocks, METH_O,
     "get_used_blocks(slot) -> list[int]\n\nThe block ids in use on `slot`, ascending ([] if it is not mapped).\n\n"
     "Raises:\n    ValueError: `slot` is out of range."},
    {"get_unmapped_slots", (PyCFunction)Allocator_get_unmapped_slots, METH_O,
     "get_unmapped_slots(n) -> list[int]\n\nThe `n` lowest slots not mapped (where growth should map next), or "
     "fewer."},
    {"add_slot", (PyCFunction)Allocator_add_slot, METH_O,
     "add_slot(slot) -> None\n\nSlot `slot` has just been mapped: its blocks become free.\n\nRaises:\n    "
     "ValueError: `slot` is out of range or already mapped; nothing changes."},
    {"remove_slot", (PyCFunction)Allocator_remove_slot, METH_O,
     "remove_slot(slot) -> None\n\nSlot `slot` is about to be unmapped: from here none of its blocks is handed "
     "out.\n\nRaises:\n    ValueError: `slot` is out of range, not mapped, or has blocks in use; nothing changes."},
    {"remove_empty_slots", (PyCFunction)(void (*)(void))Allocator_remove_empty_slots, METH_FASTCALL,
     "remove_empty_slots(most=None) -> list[int]\n\nRemove up to `most` (default: all) mapped slots with no block "
     "in use, highest first, in one step (no alloc can take from them in between); returns them."},
    {"reset", (PyCFunction)Allocator_reset, METH_NOARGS,
     "reset() -> None\n\nForget every slot and block (a cache whose contents were lost): nothing is mapped."},
    {"alloc", (PyCFunction)Allocator_alloc, METH_O,
     "alloc(n) -> list[int]\n\nUp to `n` free block ids (fewer if fewer are free), fullest slots first; slot by "
     "slot, ascending within each slot. Ignores `paused` and `closed`."},
    {"alloc_exact", (PyCFunction)Allocator_alloc_exact, METH_O,
     "alloc_exact(n) -> list[int] | None\n\n`n` block ids as `alloc` would hand them out, or None (nothing "
     "taken) if fewer than `n` are free, `n` < 0, or the allocator is paused or closed. The cache's hot path: "
     "when it leaves fewer free blocks than the low watermark and no wake is pending, it calls `wake()` (after "
     "releasing the lock; an error there is reported as unraisable, the ids are still returned)."},
    {"take", (PyCFunction)Allocator_take, METH_O,
     "take(block_ids) -> None\n\nMark chosen free blocks as in use (an engine that picks its own ids). Ignores "
     "`paused` and `closed`.\n\nRaises:\n    ValueError: A block is out of range, on an unmapped slot, already in "
     "use, or given twice (the lowest such block is named); nothing is taken then."},
    {"try_take", (PyCFunction)Allocator_try_take, METH_O,
     "try_take(block_ids) -> bool\n\n`take`, unless the allocator is paused or closed: then False and nothing is "
     "taken.\n\nRaises:\n    ValueError: As `take`."},
    {"free", (PyCFunction)Allocator_free, METH_O,
     "free(block_ids) -> list[int]\n\nGive blocks back (any iterable of ints); returns the slots that became "
     "empty, lowest first.\n\nRaises:\n    ValueError: A block is out of range, on an unmapped slot, or not in "
     "use (or given twice): the first such block of the batch is named; nothing is freed then."},
    {"set_low_watermark", (PyCFunction)(void (*)(void))Allocator_set_low_watermark, METH_FASTCALL,
     "set_low_watermark(low, wake) -> None\n\n`alloc_exact` calls `wake()` (a callable, or None for never) when "
     "it leaves fewer than `low` free blocks and `wake_pending` is False, and sets `wake_pending`."},
    {"arm_first_take", (PyCFunction)Allocator_arm_first_take, METH_O,
     "arm_first_take(hook) -> None\n\nThe next `alloc`, `alloc_exact`, `take` or `try_take` that hands out blocks "
     "calls `hook(used)` (after releasing the lock; `used`: the blocks in use just after it), once: the hook is "
     "then disarmed. None disarms it. (A growth's demand meter times the first request after its decision.)"},
    {"__copy__", (PyCFunction)Allocator_copy, METH_NOARGS, "An independent copy of the block state."},
    {"__deepcopy__", (PyCFunction)Allocator_deepcopy, METH_O, "An independent copy of the block state."},
    {"_check", (PyCFunction)Allocator_check, METH_NOARGS,
     "_check() -> None\n\nRaises AssertionError naming the first broken invariant of the C state (for tests)."},
    {NULL},
};

static PyTypeObject AllocatorType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvmem._block_allocator.BlockAllocator",
    .tp_basicsize = sizeof(Allocator),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "BlockAllocator(blocks_per_slot, max_slots)\n\nPage-aware block ids: see kvmem.block_allocator.",
    .tp_new = Allocator_new,
    .tp_dealloc = (destructor)Allocator_dealloc,
    .tp_traverse = (traverseproc)Allocator_traverse,
    .tp_clear = (inquiry)Allocator_clear,
    .tp_methods = Allocator_methods,
    .tp_members = Allocator_members,
    .tp_getset = Allocator_getset,
};

static int module_exec(PyObject *module) {
    if (PyType_Ready(&AllocatorType) < 0)
        return -1;
    Py_INCREF(&AllocatorType);
    if (PyModule_AddObject(module, "BlockAllocator", (PyObject *)&AllocatorType) < 0) {
        Py_DECREF(&AllocatorType);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_NOT_USED}, /* its own mutex guards every allocator (see the design note) */
#endif
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kvmem._block_allocator",
    .m_doc = "The page-aware block allocator (see kvmem.block_allocator).",
    .m_size = 0,
    .m_slots = module_slots,
};

PyMODINIT_FUNC PyInit__block_allocator(void) { return PyModuleDef_Init(&module_def); }
