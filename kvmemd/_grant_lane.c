/* kvmemd._grant_lane: the daemon's poller, and the native lane that serves an engine's GROW and
 * RETURN from its own returned pages without running Python (see kvmemd/lane.py for the policy).
 *
 * Design note
 * -----------
 * Why C. A grant and its return cost the Python daemon 60-90 µs of CPU (event loop, decoding,
 * arbitration, the pool's bookkeeping, encoding), more than a bare Python exchange of the same
 * descriptors costs on its own (benchmarks/README.md, "Grants through the daemon"). The common case
 * on an engine's grant path needs none of that policy: an engine cycles the pages it just returned
 * (a request ends, the next begins) while nobody else waits for pages and its limit has room.
 *
 * What it is. A `GrantLane` is the event loop's poller (epoll, level-triggered; `register`,
 * `modify`, `unregister`, `poll`, the same events as `selectors`: 1 read, 2 write). Python may
 * *arm* an engine: give the lane the engine's connection and grant channel, its held count and
 * limit, and some of the pages the engine just returned as *credit* (page id and the page's
 * exported descriptor, which the daemon's pool keeps open while the page exists). While armed, the
 * lane reads the engine's sockets itself when they are readable and serves:
 * - a GROW on the grant channel asking for no more pages than the credit holds, within the limit
 *   (held + pages <= max_held) and within one message's descriptors: one GRANT (done) with credit
 *   pages, sent at once; the pages become *lane-granted* to that engine;
 * - a RETURN on the connection naming only pages lane-granted to that engine, each once, that fits
 *   the credit's cap: the pages become credit again (the same model's pages, so nothing to zero).
 * Anything else it reads from an armed engine's socket (another message, a GROW it cannot serve in
 * full, a bad frame, a send that would block) is kept whole, frame and descriptors, and the fd is
 * reported readable; Python takes the frame (`take_frame`), disarms the engine and handles it as
 * if it had read it itself. So every message is handled exactly once, in the order its socket
 * delivered it, and nothing the lane does not fully check is served by it.
 *
 * Python's records stay true. `take_counters` hands over, per engine served since the last call,
 * its lane-granted count and the grants, pages granted and returned, and (when asked) each grant's
 * latency; `disarm` gives back the credit's page ids (Python returns them to the pool) and the
 * lane-granted ids (Python adds them to what the engine holds). The lane never creates, zeroes or
 * releases a page and never changes the pool: it only moves pages between one engine and its own
 * credit.
 *
 * Protocol facts it relies on (kvmem/common/protocol.py, docs/protocol.md; checked against that
 * module by kvmemd/lane.py at import): a frame is a 12-byte header (magic "KVMM", version u8, type
 * u8, zero u16, body length u32, big-endian) and a body; GROW's body is req, pages, wait_ms (u32
 * each); RETURN's is its page ids (u32 each, at most MAX_RETURN_IDS); GRANT's is req, flags (bit 0:
 * done) and one page id per descriptor (at most 253, SCM_MAX_FD).
 *
 * Threads. Every method runs on the daemon's loop thread. `poll` releases the GIL for its whole
 * duration and touches no Python object meanwhile; the other methods hold it. Nothing here is
 * called from two threads at once, so the lane has no lock.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define EVENT_READ 1
#define EVENT_WRITE 2

#define HEADER_SIZE 12
#define MAX_FRAME (64 * 1024)
#define MAX_FDS_PER_MESSAGE 253
#define MSG_GROW 2
#define MSG_RETURN 3
#define MSG_GRANT 21
#define GRANT_DONE 0x1
#define MAX_RETURN_IDS 4096
#define MAX_PAGES_PER_REQUEST (1 << 20)
#define MAX_WAIT_MS 600000
#define MAX_REQ 0x7fffffffu

/* Frames read from one socket per readiness event: one chatty engine cannot starve the others. */
#define READS_PER_EVENT 64
#define MAX_EVENTS 64
/* Grant latencies kept between two `take_counters` (the rest are counted, not kept). */
#define MAX_LATENCIES 4096

typedef struct {
    uint32_t id;
    int fd;
} CreditPage;

/* One armed engine. */
typedef struct {
    int in_use;
    long long client_id;
    int conn_fd, channel_fd;
    long long held_base; /* pages the engine holds outside the lane (fixed while armed) */
    long long max_held;  /* its limit: held_base + lane_held never exceeds it */
    long long lane_held; /* pages lane-granted to it and not returned */
    CreditPage *credit;
    Py_ssize_t ncredit, credit_cap; /* credit_cap: the most credit pages it may keep */
    long long grants, pages_granted, pages_returned; /* since the last take_counters */
    long long *latencies;
    int nlatencies;
    int active; /* served since the last take_counters */
    long long last_active_ns;
} Armed;

/* What the lane knows of one registered descriptor. */
typedef struct {
    int registered;
    int events;
    int armed; /* index into lane->armed, or -1 */
    /* A frame read and not served, for Python (`take_frame`). */
    int has_stash;
    char *stash;
    Py_ssize_t stash_len;
    int stash_fds[MAX_FDS_PER_MESSAGE];
    int stash_nfds;
    int stash_flags;
} FdEntry;

typedef struct {
    PyObject_HEAD int epfd;
    FdEntry *fds;
    int nfds;
    Armed *armed;
    int narmed;
    int32_t *owner; /* page id -> armed index + 1 while lane-granted to it, else 0 */
    int *page_fd;   /* page id -> its exported descriptor while credit or lane-granted */
    uint32_t npages;
    long long credit_total;
    int record_latencies;
    int version;
    char *buf; /* one received frame */
    /* Descriptors of armed connections read while serving a GROW, which Python must read (see serve_grow). */
    int report[MAX_EVENTS];
    int nreport;
} Lane;

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static uint32_t get_u32(const char *p) {
    const unsigned char *u = (const unsigned char *)p;
    return ((uint32_t)u[0] << 24) | ((uint32_t)u[1] << 16) | ((uint32_t)u[2] << 8) | u[3];
}

static void put_u32(char *p, uint32_t v) {
    unsigned char *u = (unsigned char *)p;
    u[0] = v >> 24;
    u[1] = v >> 16;
    u[2] = v >> 8;
    u[3] = v;
}

static int fd_ok(Lane *lane, int fd) { return fd >= 0 && fd < lane->nfds && lane->fds[fd].registered; }

static int grow_fds(Lane *lane, int fd) {
    if (fd < lane->nfds)
        return 0;
    int n = lane->nfds ? lane->nfds : 64;
    while (n <= fd)
        n *= 2;
    FdEntry *grown = realloc(lane->fds, (size_t)n * sizeof(FdEntry));
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(grown + lane->nfds, 0, (size_t)(n - lane->nfds) * sizeof(FdEntry));
    for (int i = lane->nfds; i < n; i++)
        grown[i].armed = -1;
    lane->fds = grown;
    lane->nfds = n;
    return 0;
}

static int grow_pages(Lane *lane, uint32_t id) {
    if (id < lane->npages)
        return 0;
    uint32_t n = lane->npages ? lane->npages : 1024;
    while (n <= id)
        n *= 2;
    int32_t *owner = realloc(lane->owner, (size_t)n * sizeof(int32_t));
    if (owner == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    lane->owner = owner;
    int *page_fd = realloc(lane->page_fd, (size_t)n * sizeof(int));
    if (page_fd == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    lane->page_fd = page_fd;
    for (uint32_t i = lane->npages; i < n; i++) {
        owner[i] = 0;
        page_fd[i] = -1;
    }
    lane->npages = n;
    return 0;
}

static void drop_stash(FdEntry *e) {
    if (!e->has_stash)
        return;
    for (int i = 0; i < e->stash_nfds; i++)
        close(e->stash_fds[i]);
    free(e->stash);
    e->stash = NULL;
    e->has_stash = 0;
    e->stash_nfds = 0;
}

/* ---- serving (GIL released: C only) ---- */

/* Whether `frame` (n bytes) has a valid header of `type` whose body is the rest of the frame. */
static int header_is(Lane *lane, const char *frame, ssize_t n, int type) {
    return n >= HEADER_SIZE && memcmp(frame, "KVMM", 4) == 0 && (unsigned char)frame[4] == lane->version &&
           (unsigned char)frame[5] == type && frame[6] == 0 && frame[7] == 0 &&
           get_u32(frame + 8) == (uint32_t)(n - HEADER_SIZE);
}

static int serve_fd(Lane *lane, int fd);

/* Serve a GROW in full from the credit, or return 0 (nothing changed). */
static int serve_grow(Lane *lane, int index, const char *frame, ssize_t n, long long received_ns) {
    Armed *a = &lane->armed[index];
    if (!header_is(lane, frame, n, MSG_GROW) || n != HEADER_SIZE + 12)
        return 0;
    uint32_t req = get_u32(frame + 12), pages = get_u32(frame + 16), wait_ms = get_u32(frame + 20);
    if (req < 1 || req > MAX_REQ || pages < 1 || pages > MAX_PAGES_PER_REQUEST || wait_ms > MAX_WAIT_MS)
        return 0; /* Python says what is wrong with it */
    if (pages > a->ncredit && !lane->fds[a->conn_fd].has_stash) {
        char grow[HEADER_SIZE + 12];
        memcpy(grow, frame, sizeof(grow)); /* (frame is the lane's buffer, which the read below reuses) */
        /* The engine sent its RETURN on its connection before this GROW on its channel, and the two
         * sockets are read in whatever order epoll lists them: take what the connection holds first.
         * (Its frames keep their order; one the lane does not serve is kept for Python and reported.) */
        if (serve_fd(lane, a->conn_fd) && lane->nreport < MAX_EVENTS)
            lane->report[lane->nreport++] = a->conn_fd;
        memcpy(lane->buf, grow, sizeof(grow));
    }
    if (pages > MAX_FDS_PER_MESSAGE || pages > a->ncredit || a->held_base + a->lane_held + pages > a->max_held)
        return 0; /* more than the lane may give: the arbiter decides */
    char out[HEADER_SIZE + 8 + 4 * MAX_FDS_PER_MESSAGE];
    uint32_t body = 8 + 4 * pages;
    memcpy(out, "KVMM", 4);
    out[4] = (char)lane->version;
    out[5] = MSG_GRANT;
    out[6] = out[7] = 0;
    put_u32(out + 8, body);
    put_u32(out + 12, req);
    put_u32(out + 16, GRANT_DONE);
    union {
        char buf[CMSG_SPACE(MAX_FDS_PER_MESSAGE * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {out, HEADER_SIZE + body};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(pages * sizeof(int));
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(pages * sizeof(int));
    int *fds = (int *)CMSG_DATA(cmsg);
    /* The last credit pages (most recently returned) go first. */
    Py_ssize_t first = a->ncredit - pages;
    for (uint32_t i = 0; i < pages; i++) {
        put_u32(out + 20 + 4 * i, a->credit[first + i].id);
        fds[i] = a->credit[first + i].fd;
    }
    ssize_t sent;
    do {
        sent = sendmsg(a->channel_fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent != (ssize_t)(HEADER_SIZE + body))
        return 0; /* full or broken: Python queues or drops it (SEQPACKET sends all or nothing) */
    for (uint32_t i = 0; i < pages; i++)
        lane->owner[a->credit[first + i].id] = index + 1;
    a->ncredit = first;
    a->lane_held += pages;
    lane->credit_total -= pages;
    a->grants += 1;
    a->pages_granted += pages;
    long long done = now_ns();
    if (lane->record_latencies && a->nlatencies < MAX_LATENCIES)
        a->latencies[a->nlatencies++] = done - received_ns;
    a->active = 1;
    a->last_active_ns = done;
    return 1;
}

/* Take a RETURN of lane-granted pages back into the credit, or return 0 (nothing changed). */
static int serve_return(Lane *lane, int index, const char *frame, ssize_t n) {
    Armed *a = &lane->armed[index];
    if (!header_is(lane, frame, n, MSG_RETURN) || (n - HEADER_SIZE) % 4)
        return 0;
    Py_ssize_t count = (n - HEADER_SIZE) / 4;
    if (count < 1 || count > MAX_RETURN_IDS || a->ncredit + count > a->credit_cap)
        return 0;
    Py_ssize_t checked = 0;
    for (; checked < count; checked++) {
        uint32_t id = get_u32(frame + HEADER_SIZE + 4 * checked);
        if (id >= lane->npages || lane->owner[id] != index + 1)
            break;
        lane->owner[id] = 0; /* a second mention of the id fails the check above */
    }
    if (checked < count) {
        for (Py_ssize_t i = 0; i < checked; i++)
            lane->owner[get_u32(frame + HEADER_SIZE + 4 * i)] = index + 1;
        return 0;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        uint32_t id = get_u32(frame + HEADER_SIZE + 4 * i);
        a->credit[a->ncredit].id = id;
        a->credit[a->ncredit].fd = lane->page_fd[id];
        a->ncredit++;
    }
    a->lane_held -= count;
    lane->credit_total += count;
    a->pages_returned += count;
    a->active = 1;
    a->last_active_ns = now_ns();
    return 1;
}

/* Read and serve what an armed engine's socket holds. Returns 1 when Python must read the fd (a frame
 * kept for it, end of file or an error), 0 when everything read was served. */
static int serve_fd(Lane *lane, int fd) {
    FdEntry *e = &lane->fds[fd];
    int index = e->armed;
    Armed *a = &lane->armed[index];
    for (int i = 0; i < READS_PER_EVENT; i++) {
        union {
            char buf[CMSG_SPACE(MAX_FDS_PER_MESSAGE * sizeof(int))];
            struct cmsghdr align;
        } control;
        struct iovec iov = {lane->buf, MAX_FRAME + 1};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof(control.buf);
        ssize_t n = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        if (n < 0)
            return 1; /* Python's own read meets the error or the end */
        int nfds = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                int *received = (int *)CMSG_DATA(c);
                for (int j = 0; j < k; j++) {
                    if (nfds < MAX_FDS_PER_MESSAGE)
                        e->stash_fds[nfds++] = received[j];
                    else
                        close(received[j]);
                }
            }
        }
        if (n == 0 && nfds == 0)
            return 1; /* the peer closed: Python reads the end of file too */
        int clean = nfds == 0 && !(msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC));
        long long received_ns = now_ns();
        if (clean && fd == a->channel_fd && serve_grow(lane, index, lane->buf, n, received_ns))
            continue;
        if (clean && fd == a->conn_fd && serve_return(lane, index, lane->buf, n))
            continue;
        /* Not ours to serve: keep it whole for Python. */
        ssize_t keep = n > MAX_FRAME + 1 ? MAX_FRAME + 1 : n;
        e->stash = malloc(keep > 0 ? (size_t)keep : 1);
        if (e->stash == NULL) {
            for (int j = 0; j < nfds; j++)
                close(e->stash_fds[j]);
            e->stash_nfds = 0;
            return 1; /* (out of memory: the frame is lost; Python finds the socket as it is) */
        }
        memcpy(e->stash, lane->buf, (size_t)keep);
        e->stash_len = keep;
        e->stash_nfds = nfds;
        e->stash_flags = msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC); /* what a reader must check */
        e->has_stash = 1;
        return 1;
    }
    return 0; /* more may wait: the fd stays readable and is served on the next round */
}

/* ---- the Python type ---- */

static PyObject *Lane_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"version", NULL};
    int version;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "i", kwlist, &version))
        return NULL;
    if (version < 0 || version > 255) {
        PyErr_Format(PyExc_ValueError, "protocol version %d is not a u8", version);
        return NULL;
    }
    Lane *self = (Lane *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->epfd = -1;
    self->version = version;
    self->buf = malloc(MAX_FRAME + 1);
    if (self->buf == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void lane_free_armed(Armed *a) {
    free(a->credit);
    free(a->latencies);
    memset(a, 0, sizeof(*a));
}

static void Lane_close_all(Lane *self) {
    for (int fd = 0; fd < self->nfds; fd++)
        drop_stash(&self->fds[fd]);
    for (int i = 0; i < self->narmed; i++)
        lane_free_armed(&self->armed[i]);
    free(self->armed);
    self->armed = NULL;
    self->narmed = 0;
    free(self->fds);
    self->fds = NULL;
    self->nfds = 0;
    free(self->owner);
    free(self->page_fd);
    self->owner = NULL;
    self->page_fd = NULL;
    self->npages = 0;
    self->credit_total = 0;
    if (self->epfd >= 0)
        close(self->epfd);
    self->epfd = -1;
}

static void Lane_dealloc(Lane *self) {
    Lane_close_all(self);
    free(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_open(Lane *self) {
    if (self->epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "the grant lane is closed");
        return -1;
    }
    return 0;
}

static uint32_t epoll_events(int events) {
    return ((events & EVENT_READ) ? EPOLLIN : 0) | ((events & EVENT_WRITE) ? EPOLLOUT : 0);
}

static PyObject *Lane_register(Lane *self, PyObject *args) {
    int fd, events;
    if (!PyArg_ParseTuple(args, "ii", &fd, &events) || check_open(self) < 0)
        return NULL;
    if (fd < 0 || (events & ~(EVENT_READ | EVENT_WRITE)) || !events) {
        PyErr_Format(PyExc_ValueError, "register(%d, %d): a descriptor and events 1 (read), 2 (write) or 3", fd, events);
        return NULL;
    }
    if (grow_fds(self, fd) < 0)
        return NULL;
    if (self->fds[fd].registered) {
        PyErr_Format(PyExc_KeyError, "descriptor %d is already registered", fd);
        return NULL;
    }
    struct epoll_event ev = {.events = epoll_events(events), .data.fd = fd};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    self->fds[fd].registered = 1;
    self->fds[fd].events = events;
    self->fds[fd].armed = -1;
    Py_RETURN_NONE;
}

static PyObject *Lane_modify(Lane *self, PyObject *args) {
    int fd, events;
    if (!PyArg_ParseTuple(args, "ii", &fd, &events) || check_open(self) < 0)
        return NULL;
    if (!fd_ok(self, fd)) {
        PyErr_Format(PyExc_KeyError, "descriptor %d is not registered", fd);
        return NULL;
    }
    if ((events & ~(EVENT_READ | EVENT_WRITE)) || !events) {
        PyErr_Format(PyExc_ValueError, "modify(%d, %d): events must be 1, 2 or 3", fd, events);
        return NULL;
    }
    struct epoll_event ev = {.events = epoll_events(events), .data.fd = fd};
    if (epoll_ctl(self->epfd, EPOLL_CTL_MOD, fd, &ev) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    self->fds[fd].events = events;
    Py_RETURN_NONE;
}

static PyObject *Lane_unregister(Lane *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd) || check_open(self) < 0)
        return NULL;
    if (!fd_ok(self, fd)) {
        PyErr_Format(PyExc_KeyError, "descriptor %d is not registered", fd);
        return NULL;
    }
    if (self->fds[fd].armed >= 0) {
        PyErr_Format(PyExc_RuntimeError, "descriptor %d belongs to an armed engine: disarm it first", fd);
        return NULL;
    }
    /* (The socket may be closed already by its owner: then the kernel has dropped it from the set.) */
    if (epoll_ctl(self->epfd, EPOLL_CTL_DEL, fd, NULL) < 0 && errno != EBADF && errno != ENOENT)
        return PyErr_SetFromErrno(PyExc_OSError);
    drop_stash(&self->fds[fd]);
    self->fds[fd].registered = 0;
    self->fds[fd].events = 0;
    Py_RETURN_NONE;
}

static PyObject *Lane_poll(Lane *self, PyObject *args) {
    double timeout, serve_for;
    if (!PyArg_ParseTuple(args, "dd", &timeout, &serve_for) || check_open(self) < 0)
        return NULL;
    if (timeout < 0)
        timeout = 0;
    if (serve_for < 0)
        serve_for = 0;
    int out_fd[2 * MAX_EVENTS], out_mask[2 * MAX_EVENTS]; /* events, and the connections serve_grow read */
    int nout = 0, failed_errno = 0;
    Py_BEGIN_ALLOW_THREADS;
    long long start = now_ns();
    long long deadline = start + (long long)(timeout * 1e9);
    long long serve_deadline = -1;
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        long long now = now_ns();
        long long until = deadline;
        if (serve_deadline >= 0 && serve_deadline < until)
            until = serve_deadline;
        long long left = until - now;
        int wait_ms = left <= 0 ? 0 : (int)((left + 999999) / 1000000); /* rounded up, as selectors does */
        int n = epoll_wait(self->epfd, events, MAX_EVENTS, wait_ms);
        if (n < 0) {
            if (errno != EINTR)
                failed_errno = errno;
            break; /* a signal: back to Python, whose handler must run */
        }
        int served = 0;
        self->nreport = 0;
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            uint32_t ev = events[i].events;
            if (fd < 0 || fd >= self->nfds || !self->fds[fd].registered)
                continue;
            FdEntry *e = &self->fds[fd];
            int read = (ev & ~EPOLLOUT) != 0;
            if (read && e->armed >= 0 && !e->has_stash && (ev & EPOLLIN)) {
                read = serve_fd(self, fd);
                served = 1;
            }
            int mask = (read ? EVENT_READ : 0) | ((ev & ~EPOLLIN) ? EVENT_WRITE : 0);
            mask &= e->events;
            if (mask) {
                out_fd[nout] = fd;
                out_mask[nout] = mask;
                nout++;
            }
        }
        for (int i = 0; i < self->nreport; i++) {
            int fd = self->report[i], seen = 0;
            for (int j = 0; j < nout; j++)
                seen |= out_fd[j] == fd;
            if (!seen && (self->fds[fd].events & EVENT_READ)) {
                out_fd[nout] = fd;
                out_mask[nout] = EVENT_READ;
                nout++;
            }
        }
        if (nout)
            break;
        now = now_ns();
        if (served && serve_deadline < 0)
            serve_deadline = now + (long long)(serve_for * 1e9);
        if (now >= deadline || (serve_deadline >= 0 && now >= serve_deadline))
            break;
    }
    Py_END_ALLOW_THREADS;
    if (failed_errno) {
        errno = failed_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *result = PyList_New(nout);
    if (result == NULL)
        return NULL;
    for (int i = 0; i < nout; i++) {
        PyObject *item = Py_BuildValue("(ii)", out_fd[i], out_mask[i]);
        if (item == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyList_SET_ITEM(result, i, item);
    }
    return result;
}

static PyObject *Lane_take_frame(Lane *self, PyObject *args) {
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd) || check_open(self) < 0)
        return NULL;
    if (!fd_ok(self, fd) || !self->fds[fd].has_stash)
        Py_RETURN_NONE;
    FdEntry *e = &self->fds[fd];
    PyObject *fds = PyList_New(e->stash_nfds);
    if (fds == NULL)
        return NULL;
    for (int i = 0; i < e->stash_nfds; i++) {
        PyObject *v = PyLong_FromLong(e->stash_fds[i]);
        if (v == NULL) {
            Py_DECREF(fds);
            return NULL;
        }
        PyList_SET_ITEM(fds, i, v);
    }
    PyObject *result = Py_BuildValue("(y#Ni)", e->stash, e->stash_len, fds, e->stash_flags);
    if (result == NULL)
        return NULL;
    /* The descriptors are the caller's now. */
    free(e->stash);
    e->stash = NULL;
    e->stash_nfds = 0;
    e->has_stash = 0;
    return result;
}

static int find_armed(Lane *self, long long client_id) {
    for (int i = 0; i < self->narmed; i++)
        if (self->armed[i].in_use && self->armed[i].client_id == client_id)
            return i;
    return -1;
}

static PyObject *Lane_arm(Lane *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"client_id", "conn_fd", "channel_fd", "held", "max_held", "credit_cap", "credit", NULL};
    long long client_id, held, max_held;
    int conn_fd, channel_fd;
    Py_ssize_t credit_cap;
    PyObject *credit;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LiiLLnO!", kwlist, &client_id, &conn_fd, &channel_fd, &held,
                                     &max_held, &credit_cap, &PyList_Type, &credit) ||
        check_open(self) < 0)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(credit);
    if (find_armed(self, client_id) >= 0) {
        PyErr_Format(PyExc_RuntimeError, "client %lld is armed already", client_id);
        return NULL;
    }
    if (!fd_ok(self, conn_fd) || !fd_ok(self, channel_fd) || conn_fd == channel_fd ||
        self->fds[conn_fd].armed >= 0 || self->fds[channel_fd].armed >= 0) {
        PyErr_Format(PyExc_ValueError, "arm(%lld): its connection and channel must be registered, apart and unarmed",
                     client_id);
        return NULL;
    }
    if (held < 0 || max_held < held || credit_cap < n || credit_cap > MAX_RETURN_IDS + MAX_FDS_PER_MESSAGE) {
        PyErr_Format(PyExc_ValueError, "arm(%lld): held %lld, max_held %lld, credit %zd of cap %zd do not fit",
                     client_id, held, max_held, n, credit_cap);
        return NULL;
    }
    CreditPage *pages = malloc((size_t)(credit_cap > 0 ? credit_cap : 1) * sizeof(CreditPage));
    long long *latencies = malloc(MAX_LATENCIES * sizeof(long long));
    if (pages == NULL || latencies == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(credit, i);
        unsigned int id;
        int fd;
        if (!PyArg_ParseTuple(item, "Ii", &id, &fd) || fd < 0 || grow_pages(self, id) < 0 || self->owner[id] != 0) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "credit page %u (descriptor %d) is not a page the lane may keep", id, fd);
            goto fail;
        }
        for (Py_ssize_t j = 0; j < i; j++)
            if (pages[j].id == id) {
                PyErr_Format(PyExc_ValueError, "credit page %u is named twice", id);
                goto fail;
            }
        pages[i].id = id;
        pages[i].fd = fd;
    }
    int index = -1;
    for (int i = 0; i < self->narmed; i++)
        if (!self->armed[i].in_use) {
            index = i;
            break;
        }
    if (index < 0) {
        Armed *grown = realloc(self->armed, (size_t)(self->narmed + 1) * sizeof(Armed));
        if (grown == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        self->armed = grown;
        index = self->narmed++;
    }
    Armed *a = &self->armed[index];
    memset(a, 0, sizeof(*a));
    a->in_use = 1;
    a->client_id = client_id;
    a->conn_fd = conn_fd;
    a->channel_fd = channel_fd;
    a->held_base = held;
    a->max_held = max_held;
    a->credit = pages;
    a->ncredit = n;
    a->credit_cap = credit_cap;
    a->latencies = latencies;
    a->last_active_ns = now_ns();
    for (Py_ssize_t i = 0; i < n; i++)
        self->page_fd[pages[i].id] = pages[i].fd;
    self->credit_total += n;
    self->fds[conn_fd].armed = index;
    self->fds[channel_fd].armed = index;
    Py_RETURN_NONE;
fail:
    free(pages);
    free(latencies);
    return NULL;
}

/* (client_id, lane_held, grants, pages_granted, pages_returned, [latency seconds...]) of `a`; resets its counts. */
static PyObject *counters_of(Armed *a) {
    PyObject *latencies = PyList_New(a->nlatencies);
    if (latencies == NULL)
        return NULL;
    for (int i = 0; i < a->nlatencies; i++) {
        PyObject *v = PyFloat_FromDouble(a->latencies[i] / 1e9);
        if (v == NULL) {
            Py_DECREF(latencies);
            return NULL;
        }
        PyList_SET_ITEM(latencies, i, v);
    }
    PyObject *item = Py_BuildValue("(LLLLLN)", a->client_id, a->lane_held, a->grants, a->pages_granted,
                                   a->pages_returned, latencies);
    if (item == NULL)
        return NULL;
    a->grants = a->pages_granted = a->pages_returned = 0;
    a->nlatencies = 0;
    a->active = 0;
    return item;
}

static PyObject *Lane_take_counters(Lane *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *result = PyList_New(0);
    if (result == NULL)
        return NULL;
    for (int i = 0; i < self->narmed; i++) {
        Armed *a = &self->armed[i];
        if (!a->in_use || !a->active)
            continue;
        PyObject *item = counters_of(a);
        if (item == NULL || PyList_Append(result, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(result);
            return NULL;
        }
        Py_DECREF(item);
    }
    return result;
}

static PyObject *Lane_disarm(Lane *self, PyObject *args) {
    long long client_id;
    if (!PyArg_ParseTuple(args, "L", &client_id) || check_open(self) < 0)
        return NULL;
    int index = find_armed(self, client_id);
    if (index < 0) {
        PyErr_Format(PyExc_KeyError, "client %lld is not armed", client_id);
        return NULL;
    }
    Armed *a = &self->armed[index];
    PyObject *counters = counters_of(a);
    PyObject *credit = PyList_New(a->ncredit);
    PyObject *held = PyList_New(0);
    if (counters == NULL || credit == NULL || held == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < a->ncredit; i++) {
        PyObject *v = PyLong_FromUnsignedLong(a->credit[i].id);
        if (v == NULL)
            goto fail;
        PyList_SET_ITEM(credit, i, v);
    }
    long long found = 0;
    for (uint32_t id = 0; id < self->npages && found < a->lane_held; id++) {
        if (self->owner[id] != index + 1)
            continue;
        PyObject *v = PyLong_FromUnsignedLong(id);
        if (v == NULL || PyList_Append(held, v) < 0) {
            Py_XDECREF(v);
            goto fail;
        }
        Py_DECREF(v);
        found++;
    }
    /* Nothing can fail from here: the lane forgets the engine. */
    for (uint32_t id = 0; id < self->npages; id++)
        if (self->owner[id] == index + 1) {
            self->owner[id] = 0;
            self->page_fd[id] = -1;
        }
    for (Py_ssize_t i = 0; i < a->ncredit; i++)
        self->page_fd[a->credit[i].id] = -1;
    self->credit_total -= a->ncredit;
    self->fds[a->conn_fd].armed = -1;
    self->fds[a->channel_fd].armed = -1;
    lane_free_armed(a);
    return Py_BuildValue("(NNN)", counters, credit, held);
fail:
    Py_XDECREF(counters);
    Py_XDECREF(credit);
    Py_XDECREF(held);
    return NULL;
}

static PyObject *Lane_last_active(Lane *self, PyObject *args) {
    long long client_id;
    if (!PyArg_ParseTuple(args, "L", &client_id))
        return NULL;
    int index = find_armed(self, client_id);
    if (index < 0) {
        PyErr_Format(PyExc_KeyError, "client %lld is not armed", client_id);
        return NULL;
    }
    return PyFloat_FromDouble(self->armed[index].last_active_ns / 1e9);
}

static PyObject *Lane_close(Lane *self, PyObject *Py_UNUSED(ignored)) {
    Lane_close_all(self);
    Py_RETURN_NONE;
}

static PyObject *Lane_get_credit(Lane *self, void *Py_UNUSED(closure)) { return PyLong_FromLongLong(self->credit_total); }

static PyObject *Lane_get_record_latencies(Lane *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(self->record_latencies);
}

static int Lane_set_record_latencies(Lane *self, PyObject *value, void *Py_UNUSED(closure)) {
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "record_latencies cannot be deleted");
        return -1;
    }
    int truth = PyObject_IsTrue(value);
    if (truth < 0)
        return -1;
    self->record_latencies = truth;
    return 0;
}

static PyMethodDef Lane_methods[] = {
    {"register", (PyCFunction)Lane_register, METH_VARARGS, "register(fd, events): watch fd (1 read, 2 write)."},
    {"modify", (PyCFunction)Lane_modify, METH_VARARGS, "modify(fd, events): change what fd is watched for."},
    {"unregister", (PyCFunction)Lane_unregister, METH_VARARGS,
     "unregister(fd): stop watching fd (a frame kept for it is dropped, its descriptors closed)."},
    {"poll", (PyCFunction)Lane_poll, METH_VARARGS,
     "poll(timeout, serve_for) -> [(fd, events)]: wait up to timeout seconds for events Python must handle, "
     "serving armed engines meanwhile; once something was served, return within serve_for seconds."},
    {"take_frame", (PyCFunction)Lane_take_frame, METH_VARARGS,
     "take_frame(fd) -> (frame, fds, msg_flags) | None: the frame read from fd and kept for Python."},
    {"arm", (PyCFunction)(void (*)(void))Lane_arm, METH_VARARGS | METH_KEYWORDS,
     "arm(client_id, conn_fd, channel_fd, held, max_held, credit_cap, credit): serve this engine from credit "
     "[(page_id, fd)]."},
    {"disarm", (PyCFunction)Lane_disarm, METH_VARARGS,
     "disarm(client_id) -> (counters, credit_ids, lane_granted_ids): stop serving the engine."},
    {"take_counters", (PyCFunction)Lane_take_counters, METH_NOARGS,
     "take_counters() -> [(client_id, lane_held, grants, pages_granted, pages_returned, latencies)] of the "
     "engines served since the last call."},
    {"last_active", (PyCFunction)Lane_last_active, METH_VARARGS,
     "last_active(client_id) -> monotonic seconds of the engine's last served message (or its arming)."},
    {"close", (PyCFunction)Lane_close, METH_NOARGS, "Close the poller; frames kept are dropped. Idempotent."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Lane_getset[] = {
    {"credit", (getter)Lane_get_credit, NULL, "Pages held as credit by every armed engine.", NULL},
    {"record_latencies", (getter)Lane_get_record_latencies, (setter)Lane_set_record_latencies,
     "Whether grants' latencies are kept for take_counters.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvmemd._grant_lane.GrantLane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The daemon's poller and native grant lane (design note in kvmemd/_grant_lane.c).",
    .tp_new = Lane_new,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_methods = Lane_methods,
    .tp_getset = Lane_getset,
};

static int module_exec(PyObject *module) {
    if (PyType_Ready(&LaneType) < 0)
        return -1;
    if (PyModule_AddObjectRef(module, "GrantLane", (PyObject *)&LaneType) < 0)
        return -1;
    /* What the lane assumes of the protocol, for kvmemd/lane.py to check against kvmem.common.protocol. */
    PyObject *facts = Py_BuildValue("{s:s,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "magic", "KVMM", "header_size",
                                    HEADER_SIZE, "max_frame", MAX_FRAME, "max_fds_per_message", MAX_FDS_PER_MESSAGE,
                                    "grow", MSG_GROW, "return", MSG_RETURN, "grant", MSG_GRANT, "max_return_ids",
                                    MAX_RETURN_IDS, "max_pages_per_request", MAX_PAGES_PER_REQUEST, "max_wait_ms",
                                    MAX_WAIT_MS);
    if (facts == NULL || PyModule_AddObject(module, "PROTOCOL_FACTS", facts) < 0) {
        Py_XDECREF(facts);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kvmemd._grant_lane",
    .m_doc = "The daemon's poller and native grant lane (design note in kvmemd/_grant_lane.c).",
    .m_size = 0,
    .m_slots = module_slots,
};

PyMODINIT_FUNC PyInit__grant_lane(void) { return PyModuleDef_Init(&module_def); }
