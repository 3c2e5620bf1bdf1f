/* The mount's compiled hot path: libfuse 3 high-level callbacks for image files.
 *
 * pcrfs.fuse.fastpath hands this module the store's index arrays (through the buffer
 * protocol: the module holds them while it uses them) and puts read/getattr/getxattr/ioctl
 * from here into the fuse_operations struct in place of mfusepy's ctypes trampolines
 * (ioctl had none: see fast_ioctl). libfuse's worker threads then serve a file's lookup
 * and read without the interpreter (no GIL): path -> (view, image)
 * through a hash table of the index's paths, the image's scan groups located
 * through the index arrays, pread from record descriptors that LocalRecords opened
 * and checked (this module receives duplicates and never opens a file itself),
 * CRC-32 of every group before any of its bytes is served.
 *
 * A remote store's records are read here only as far as a cache holds them: a
 * record prefix (pcrfs.store.prefixtier) in the memory cache (a buffer this module
 * holds a reference to) or in the disk cache (a descriptor of its file); either holds
 * the record's bytes from `base` on, groups 1..`held` of every image. Such a holder
 * can be taken back (revoke: the cache dropped or replaced it); readers hold a
 * per-record count while they use one, and revoke lets it go only once the count is
 * back at zero, so a descriptor number is never reused, nor a buffer freed, under a
 * running read.
 *
 * Anything else goes to the Python callback this replaced (the "fallback"):
 * directories, the stats file, a record without a descriptor here yet, and every
 * failure (a CRC mismatch, a short or failed pread), so that EIO, its log line and
 * its counters stay where they are. Nothing here decides policy.
 *
 * The contract with Python. configure() receives every array with its element type and
 * checks it against what the code below reads: the group lengths and CRCs u4, the group
 * and path offsets u8, the storage order u8 and positions i8, an adaptive view's ks u1,
 * IMAGE_DTYPE's n_groups (u1) and src_mtime_ns (i8) and RECORD_DTYPE's first_image (u8)
 * by their dtype strings and offsets, every length against the counts; and the values
 * an out-of-bounds read would follow (path offsets, records' first positions, the storage
 * order, every image's group count). It also takes the constants it shares with Python
 * (pcrfs.store.reader's large-group cut, the EOI marker). A mismatch raises ContractError
 * (a ValueError) naming it: the mount then serves every read in Python and logs why.
 * CONTRACT is bumped with configure()'s arguments (pcrfs.fuse.fastpath refuses a module
 * built from another version of this file).
 *
 * State. configure() returns a State object that owns everything (held arrays, tables,
 * descriptors, buffers, counters); another configure() makes another State and touches
 * no other. libfuse's callbacks carry no pointer of ours, so the one installed State
 * (install()) is reached through a process-wide pointer that holds a reference to it;
 * every callback counts itself in flight (`inflight`) around its use of that pointer, and
 * uninstall() clears the pointer and waits for the count to drain before letting the
 * State go. release() uninstalls, waits for any read_for_test still running, then frees.
 *
 * read_for_test(path, size, offset) runs the read callback's own code (resolve, record,
 * serve) on a State without FUSE and without the fallback: the bytes served here, or
 * the FELL_BACK_* code of why Python would have been asked (tests/test_fastpath_differential.py).
 *
 * No libfuse header is needed: the three callback signatures are libfuse 3's
 * (fuse.h, struct fuse_operations) and struct stat is the platform's. CRC-32 is
 * zlib's crc32, looked up in libz.so.1 when the module is imported (no zlib headers).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

typedef int (*read_cb)(const char *, char *, size_t, off_t, void *);
typedef int (*getattr_cb)(const char *, struct stat *, void *);
typedef int (*getxattr_cb)(const char *, const char *, char *, size_t);
typedef unsigned long (*crc32_fn)(unsigned long, const unsigned char *, unsigned int);

#define CONTRACT 3 /* configure()'s arguments and what they must hold; pcrfs.fuse.fastpath.CONTRACT */
#define MAX_VIEWS 64
#define VIEW_NAME_MAX 32
#define MAX_GROUPS 256    /* per image: the stack arrays of serve() and checkpoints() */
#define CKPT_STRIDE 32 /* images between stored group offsets inside a record */
#define EOI_LEN 2
static const unsigned char EOI[EOI_LEN] = {0xFF, 0xD9}; /* JPEG end of image (ITU-T T.81, B.1.1.3) */
#define FILE_MODE (S_IFREG | 0444)
#define PCRFS_XATTRS "user.pcrfs."

/* Why a read was not served here (read_for_test's answer; the callback asks Python). */
#define FELL_BACK_UNRESOLVED (-1) /* reads off, not an image file of a view here, offset < 0 */
#define FELL_BACK_NO_HOLDER (-2)  /* the record has no descriptor or buffer here (yet) */
#define FELL_BACK_DECLINED (-3)   /* a prefix with fewer groups than the view needs, a large group cut */
#define FELL_BACK_FAILED (-4)     /* a short or failed read, a CRC-32 mismatch, no memory */

typedef struct {
    char name[VIEW_NAME_MAX];
    size_t name_len;
    unsigned k;               /* groups served (fixed-k views) */
    const uint8_t *ks;        /* per-image groups (adaptive views), or NULL */
    uint64_t ino_base;        /* inode of image 0 in this view */
    uint64_t first_reads;     /* counters (atomic) */
    uint64_t served;
} View;

/* the arrays a State holds (Py_buffer slots); an adaptive view's ks follow at ARR_KS + v */
enum { ARR_LENGTHS, ARR_CRCS, ARR_IMAGES, ARR_RECORDS, ARR_GROUP_OFFSETS, ARR_BLOB, ARR_PATH_OFFSETS,
       ARR_POSITIONS, ARR_STORAGE, ARR_KS };

/* A scan group a read cut, read and checked once and kept as a private copy (see cut_piece). */
#define CUT_SLOTS 16
#define CUT_BUDGET (64u << 20) /* bytes all slots may hold together (as reader.LARGE_GROUP_BUFFER) */
enum { CUT_EMPTY, CUT_LOADING, CUT_READY };
typedef struct {
    uint64_t image, used;          /* used: a clock tick, for least-recently-used eviction */
    uint32_t group, len;
    int state;
    unsigned char *data;           /* CUT_READY: the group's checked bytes (ours alone) */
} CutSlot;

typedef struct {
    PyObject_HEAD
    int ready;                     /* configured and not released */
    uint32_t busy;                 /* calls on this State running without the GIL (atomic) */
    Py_buffer arrays[ARR_KS + MAX_VIEWS];
    /* the index (views of the held arrays) */
    uint64_t n_images, n_groups, n_records;
    const uint32_t *lengths;       /* u4[n, G] */
    const uint32_t *crcs;          /* u4[n, G] */
    const char *images;            /* IMAGE_DTYPE[n] */
    size_t image_size, off_mtime, off_ngroups;
    const char *records;           /* RECORD_DTYPE[R] */
    size_t record_size, off_first; /* first_image is u8 */
    const uint64_t *group_offsets; /* u8[R, G] */
    const unsigned char *blob;     /* paths.bin */
    const uint64_t *path_offsets;  /* u8[n + 1] */
    /* format version 2 (a storage order): records hold ranges of storage positions; NULL: v1 */
    const int64_t *positions;      /* i8[n]: storage position of each image */
    const uint64_t *storage;       /* u8[n]: image at each storage position */
    uint64_t cut_limit;            /* bytes: larger groups cut by a read go to Python (reader.KEEP_GROUP_BYTES) */
    /* built here */
    uint32_t *table;               /* image + 1 by path hash, 0: empty */
    uint64_t mask;
    uint64_t **ckpts;              /* per record: group offsets every CKPT_STRIDE images (lazy) */
    int *fds;                      /* per record: a descriptor of ours, MEM_SLOT (bufs[r]), or -1 */
    Py_buffer *bufs;               /* per record: a buffer we hold (fds[r] == MEM_SLOT) */
    uint64_t *bases;               /* per record: record offset at the descriptor's byte 0 */
    uint16_t *held;                /* per record: groups 1..held of every image are in it */
    uint8_t *cached;               /* per record: a cache file (counted apart from store reads) */
    uint32_t *users;               /* per record: reads using its descriptor now */
    View views[MAX_VIEWS];
    int n_views;
    uid_t uid;
    gid_t gid;
    int reads_on;                  /* serve reads here (local store without fetcher machinery) */
    read_cb py_read;
    getattr_cb py_getattr;
    getxattr_cb py_getxattr;
    /* groups cut by reads: a few checked private copies, one load each (cut_piece) */
    CutSlot cut[CUT_SLOTS];
    uint64_t cut_clock, cut_bytes; /* cut_bytes: what the non-empty slots hold or load */
    pthread_mutex_t cut_lock;
    pthread_cond_t cut_done;
    /* counters (atomic) */
    uint64_t store_requests, store_bytes, cache_reads, cache_bytes, fast_reads, fallback_reads, file_lookups,
        lookups, ioctls;
} State;

#define MEM_SLOT 0x7fffffff /* fds[r]: record r is served from bufs[r], not a descriptor */
#define ADD(x, v) __atomic_fetch_add(&(x), (v), __ATOMIC_RELAXED)
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_ACQUIRE)

/* process-wide, set once when the module is imported */
static crc32_fn zlib_crc32;
static int use_clmul; /* after the self-test */

/* The State libfuse's callbacks serve from (a reference held), and how many callbacks are
 * using it now. */
static State *installed;
static uint64_t inflight;

/* ---- CRC-32 -------------------------------------------------------------------------

zlib's crc32 runs at ~2.7 GB/s here: 16 us of a 43 kB file's ~55 us of daemon CPU.
On x86-64 with PCLMULQDQ the bulk of a group is folded with carry-less multiplies
(Intel, "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ", 2009: fold
by 4 x 128 bits, then to 128, 64 and 32 bits with a Barrett reduction; constants
for the bit-reflected polynomial 0xEDB88320) and zlib finishes the tail. configure()
checks it against zlib on random data of many lengths and uses zlib alone if they
ever differ. */

#if defined(__x86_64__)
#define CLMUL_MIN 64
static const uint64_t __attribute__((aligned(16))) K1K2[2] = {0x0154442bd4ULL, 0x01c6e41596ULL};
static const uint64_t __attribute__((aligned(16))) K3K4[2] = {0x01751997d0ULL, 0x00ccaa009eULL};
static const uint64_t __attribute__((aligned(16))) K5K0[2] = {0x0163cd6124ULL, 0x0000000000ULL};
static const uint64_t __attribute__((aligned(16))) POLY[2] = {0x01db710641ULL, 0x01f7011641ULL};

/* The CRC state (not inverted on entry or exit) after len bytes, len >= 64 and a
 * multiple of 16. */
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc_fold(const unsigned char *buf, size_t len,
                                                                    uint32_t crc) {
    __m128i x0, x1, x2, x3, x4, x5, x6, x7, x8, y5, y6, y7, y8;
    x1 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
    x2 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
    x3 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
    x4 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)crc));
    x0 = _mm_load_si128((const __m128i *)K1K2);
    buf += 64;
    len -= 64;
    while (len >= 64) { /* fold 4 x 128 bits by 512 bits */
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x6 = _mm_clmulepi64_si128(x2, x0, 0x00);
        x7 = _mm_clmulepi64_si128(x3, x0, 0x00);
        x8 = _mm_clmulepi64_si128(x4, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x2 = _mm_clmulepi64_si128(x2, x0, 0x11);
        x3 = _mm_clmulepi64_si128(x3, x0, 0x11);
        x4 = _mm_clmulepi64_si128(x4, x0, 0x11);
        y5 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
        y6 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
        y7 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
        y8 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), y5);
        x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), y6);
        x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), y7);
        x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), y8);
        buf += 64;
        len -= 64;
    }
    x0 = _mm_load_si128((const __m128i *)K3K4); /* fold the four into one (by 128 bits) */
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x3), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x4), x5);
    while (len >= 16) {
        x2 = _mm_loadu_si128((const __m128i *)buf);
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
        buf += 16;
        len -= 16;
    }
    /* 128 -> 64 bits */
    x2 = _mm_clmulepi64_si128(x1, x0, 0x10);
    x3 = _mm_setr_epi32(~0, 0, ~0, 0);
    x1 = _mm_srli_si128(x1, 8);
    x1 = _mm_xor_si128(x1, x2);
    x0 = _mm_loadl_epi64((const __m128i *)K5K0);
    x2 = _mm_srli_si128(x1, 4);
    x1 = _mm_and_si128(x1, x3);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    /* Barrett reduction to 32 bits */
    x0 = _mm_load_si128((const __m128i *)POLY);
    x2 = _mm_and_si128(x1, x3);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x10);
    x2 = _mm_and_si128(x2, x3);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}
#endif

/* zlib-compatible crc32(0, p, n), the bulk folded with PCLMULQDQ if clmul. */
static uint32_t crc32_with(const unsigned char *p, size_t n, int clmul) {
    uint32_t crc = 0;
#if defined(__x86_64__)
    if (clmul && n >= CLMUL_MIN) {
        size_t bulk = n & ~(size_t)15;
        crc = ~crc_fold(p, bulk, ~crc);
        p += bulk;
        n -= bulk;
    }
#endif
    unsigned long acc = crc;
    while (n) { /* zlib's length argument is an unsigned int */
        unsigned int step = n > (1u << 30) ? (1u << 30) : (unsigned int)n;
        acc = zlib_crc32(acc, p, step);
        p += step;
        n -= step;
    }
    return (uint32_t)acc;
}

static uint32_t crc32_of(const unsigned char *p, size_t n) { return crc32_with(p, n, use_clmul); }

static int clmul_agrees_with_zlib(void) {
#if defined(__x86_64__)
    if (!__builtin_cpu_supports("pclmul") || !__builtin_cpu_supports("sse4.1")) return 0;
    enum { N = 8192 };
    unsigned char *buf = malloc(N);
    if (!buf) return 0;
    uint64_t x = 0x9E3779B97F4A7C15ULL;
    for (size_t i = 0; i < N; i++) { /* xorshift: random bytes */
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        buf[i] = (unsigned char)x;
    }
    int ok = 1;
    for (size_t n = 0; n <= N && ok; n += (n < 300 ? 1 : 97)) {
        for (size_t start = 0; start < 3 && start + n <= N; start++) {
            uint32_t want = (uint32_t)zlib_crc32(0, buf + start, (unsigned int)n);
            if (crc32_with(buf + start, n, 1) != want) {
                ok = 0;
                break;
            }
        }
    }
    free(buf);
    return ok;
#else
    return 0;
#endif
}

/* ---- the index --------------------------------------------------------------------- */

static uint64_t hash_bytes(const unsigned char *p, size_t n) {
    uint64_t h = 1469598103934665603ULL; /* FNV-1a 64 */
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h ^ (h >> 29);
}

static int64_t find_image(const State *st, const char *rel, size_t n) {
    uint64_t slot = hash_bytes((const unsigned char *)rel, n) & st->mask;
    for (;;) {
        uint32_t v = st->table[slot];
        if (v == 0) return -1;
        uint64_t i = v - 1;
        uint64_t a = st->path_offsets[i], b = st->path_offsets[i + 1];
        if (b - a == n && memcmp(st->blob + a, rel, n) == 0) return (int64_t)i;
        slot = (slot + 1) & st->mask;
    }
}

static unsigned n_groups_of(const State *st, uint64_t i) {
    return (unsigned char)st->images[i * st->image_size + st->off_ngroups];
}

static int64_t mtime_of(const State *st, uint64_t i) {
    int64_t t;
    memcpy(&t, st->images + i * st->image_size + st->off_mtime, sizeof t);
    return t;
}

static uint64_t record_first(const State *st, uint64_t r) {
    uint64_t v;
    memcpy(&v, st->records + r * st->record_size + st->off_first, sizeof v);
    return v;
}

static uint64_t position_of(const State *st, uint64_t i) { return st->positions ? (uint64_t)st->positions[i] : i; }
static uint64_t image_at(const State *st, uint64_t p) { return st->storage ? st->storage[p] : p; }

static uint64_t record_of(const State *st, uint64_t i) { /* the last record whose first position is <= i's */
    uint64_t lo = 0, hi = st->n_records, p = position_of(st, i);
    while (hi - lo > 1) {
        uint64_t mid = (lo + hi) / 2;
        if (record_first(st, mid) <= p) lo = mid; else hi = mid;
    }
    return lo;
}

/* Group offsets of every CKPT_STRIDE-th image of record r (group-major layout: group g
 * of image j starts after group g of the record's images before j). Built on first use
 * by whichever thread needs it; a racing second build is freed. */
static const uint64_t *checkpoints(State *st, uint64_t r) {
    uint64_t *ck = __atomic_load_n(&st->ckpts[r], __ATOMIC_ACQUIRE);
    if (ck) return ck;
    uint64_t first = record_first(st, r);
    uint64_t end = r + 1 < st->n_records ? record_first(st, r + 1) : st->n_images;
    uint64_t G = st->n_groups, count = end - first, rows = count / CKPT_STRIDE + 1;
    ck = malloc(rows * G * sizeof *ck + 1);
    if (!ck) return NULL;
    uint64_t cur[MAX_GROUPS];
    const uint64_t *base = st->group_offsets + r * G;
    for (uint64_t g = 0; g < G; g++) cur[g] = base[g];
    memcpy(ck, cur, G * sizeof *cur);
    for (uint64_t j = 0; j < count; j++) {
        if (j % CKPT_STRIDE == 0) memcpy(ck + (j / CKPT_STRIDE) * G, cur, G * sizeof *cur);
        const uint32_t *len = st->lengths + image_at(st, first + j) * G;
        for (uint64_t g = 0; g < G; g++) cur[g] += len[g];
    }
    uint64_t *expected = NULL;
    if (!__atomic_compare_exchange_n(&st->ckpts[r], &expected, ck, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        free(ck);
        return expected;
    }
    return ck;
}

/* Offsets of groups 0..kk-1 of image i (in record r) into out. */
static int group_offsets(State *st, uint64_t i, uint64_t r, unsigned kk, uint64_t *out) {
    const uint64_t *ck = checkpoints(st, r);
    if (!ck) return -1;
    uint64_t G = st->n_groups, first = record_first(st, r), p = position_of(st, i), j = p - first;
    uint64_t row = j / CKPT_STRIDE, from = first + row * CKPT_STRIDE;
    for (unsigned g = 0; g < kk; g++) out[g] = ck[row * G + g];
    for (uint64_t m = from; m < p; m++) {
        const uint32_t *len = st->lengths + image_at(st, m) * G;
        for (unsigned g = 0; g < kk; g++) out[g] += len[g];
    }
    return 0;
}

/* "/view/rel/path" -> view and image; 0 if it names an image file. */
static int resolve(State *st, const char *path, View **view, uint64_t *image) {
    if (!path || path[0] != '/') return -1;
    const char *name = path + 1, *slash = strchr(name, '/');
    if (!slash) return -1;
    size_t n = (size_t)(slash - name);
    for (int v = 0; v < st->n_views; v++) {
        if (st->views[v].name_len == n && memcmp(st->views[v].name, name, n) == 0) {
            int64_t i = find_image(st, slash + 1, strlen(slash + 1));
            if (i < 0) return -1;
            *view = &st->views[v];
            *image = (uint64_t)i;
            return 0;
        }
    }
    return -1;
}

static unsigned groups_served(const State *st, const View *v, uint64_t i) {
    unsigned k = v->ks ? v->ks[i] : v->k, n = n_groups_of(st, i); /* n <= G: checked by configure() */
    return k < n ? k : n;
}

/* ---- reading ----------------------------------------------------------------------- */

/* One verified group into dst: pread (or a copy from record r's buffer), then CRC-32;
 * nonzero on any failure. */
static int read_group(State *st, int fd, uint64_t r, uint64_t offset, uint32_t length, uint32_t crc,
                      unsigned char *dst, int cached) {
    size_t got = 0;
    if (fd == MEM_SLOT) {
        const Py_buffer *b = &st->bufs[r];
        if (offset > (uint64_t)b->len || length > (uint64_t)b->len - offset) return -1;
        memcpy(dst, (const unsigned char *)b->buf + offset, length);
        got = length;
    }
    while (got < length) {
        ssize_t n = pread(fd, dst + got, length - got, (off_t)(offset + got));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        got += (size_t)n;
    }
    if (cached) {
        ADD(st->cache_reads, 1);
        ADD(st->cache_bytes, length);
    } else {
        ADD(st->store_requests, 1);
        ADD(st->store_bytes, length);
    }
    return crc32_of(dst, length) == crc ? 0 : -1;
}

/* Record r's descriptor for one read, or -1; a descriptor returned must be put back
 * with put_fd. Sequentially consistent on both sides (here: count, then load; revoke:
 * exchange, then wait for the count), so revoke never closes one a reader holds. */
static int take_fd(State *st, uint64_t r) {
    __atomic_fetch_add(&st->users[r], 1, __ATOMIC_SEQ_CST);
    int fd = __atomic_load_n(&st->fds[r], __ATOMIC_SEQ_CST);
    if (fd < 0) __atomic_fetch_sub(&st->users[r], 1, __ATOMIC_SEQ_CST);
    return fd;
}

static void put_fd(State *st, uint64_t r) { __atomic_fetch_sub(&st->users[r], 1, __ATOMIC_SEQ_CST); }

/* Bytes [off, off + size) of image i in view v from record r's descriptor fd (holding the
 * record from base on, groups 1..held); FELL_BACK_*: let Python serve it. */
/* The slot holding (or loading) group g of image i, or NULL. With cut_lock held. */
static CutSlot *cut_find(State *st, uint64_t i, unsigned g) {
    for (int s = 0; s < CUT_SLOTS; s++)
        if (st->cut[s].state != CUT_EMPTY && st->cut[s].image == i && st->cut[s].group == g) return &st->cut[s];
    return NULL;
}

static void cut_drop(State *st, CutSlot *c) {
    free(c->data), c->data = NULL, c->state = CUT_EMPTY;
    st->cut_bytes -= c->len;
}

/* An empty slot with room for len more bytes in CUT_BUDGET, least recently used ready
 * slots dropped to make it; NULL if loads in flight hold too much. With cut_lock held. */
static CutSlot *cut_victim(State *st, uint32_t len) {
    for (;;) {
        CutSlot *empty = NULL, *oldest = NULL;
        for (int s = 0; s < CUT_SLOTS; s++) {
            CutSlot *c = &st->cut[s];
            if (c->state == CUT_EMPTY) empty = c;
            else if (c->state == CUT_READY && (!oldest || c->used < oldest->used)) oldest = c;
        }
        if (empty && st->cut_bytes + len <= CUT_BUDGET) {
            st->cut_bytes += len;
            empty->len = len;
            return empty;
        }
        if (!oldest) return NULL;
        cut_drop(st, oldest);
    }
}

/* Bytes [a, a + n) of group g (0-based) of image i, which a read cuts, into dst. The kernel
 * reads a file in 128 KiB pieces, several at once (readahead): each piece that cuts a group
 * used to read and check the whole group again (1.5-2.3x a large file's bytes from the
 * store). Now the first reads it once into a private copy -- checked, and ours alone, so
 * nothing done to the record afterwards reaches a reader -- while concurrent reads of the
 * same group wait for it; the last CUT_SLOTS such groups are kept. 0, or -1 (damaged). */
static int cut_piece(State *st, int fd, uint64_t r, uint64_t i, unsigned g, uint64_t offset, uint32_t len,
                     uint32_t crc, int cached, uint64_t a, uint64_t n, char *dst) {
    pthread_mutex_lock(&st->cut_lock);
    CutSlot *c;
    while ((c = cut_find(st, i, g)) && c->state == CUT_LOADING) pthread_cond_wait(&st->cut_done, &st->cut_lock);
    if (c) { /* ready */
        memcpy(dst, c->data + a, n);
        c->used = ++st->cut_clock;
        pthread_mutex_unlock(&st->cut_lock);
        return 0;
    }
    c = cut_victim(st, len);
    if (c) c->image = i, c->group = g, c->state = CUT_LOADING;
    pthread_mutex_unlock(&st->cut_lock);
    unsigned char *tmp = malloc(len ? len : 1);
    int rc = tmp ? read_group(st, fd, r, offset, len, crc, tmp, cached) : -1;
    if (rc == 0) memcpy(dst, tmp + a, n);
    pthread_mutex_lock(&st->cut_lock);
    if (c && rc == 0) c->data = tmp, c->state = CUT_READY, c->used = ++st->cut_clock, tmp = NULL;
    else if (c) cut_drop(st, c); /* a damaged group is never kept: the next read checks again */
    pthread_cond_broadcast(&st->cut_done);
    pthread_mutex_unlock(&st->cut_lock);
    free(tmp);
    return rc;
}

static int serve(State *st, View *v, uint64_t i, uint64_t r, int fd, char *buf, size_t size, off_t off) {
    unsigned kk = groups_served(st, v, i);
    if (kk > st->held[r]) return FELL_BACK_DECLINED; /* a record prefix with fewer groups than this view needs */
    uint64_t base = st->bases[r];
    int cached = st->cached[r];
    const uint32_t *len = st->lengths + i * st->n_groups, *crc = st->crcs + i * st->n_groups;
    uint64_t offs[MAX_GROUPS];
    if (group_offsets(st, i, r, kk, offs) != 0) return FELL_BACK_FAILED;
    for (unsigned g = 0; g < kk; g++) {
        if (offs[g] < base) return FELL_BACK_FAILED;
        offs[g] -= base;
    }
    uint64_t fsize = EOI_LEN;
    for (unsigned g = 0; g < kk; g++) fsize += len[g];
    uint64_t start = (uint64_t)off, end = start + size;
    if (end > fsize) end = fsize;
    if (start >= end) return 0;
    uint64_t pos = 0;
    for (unsigned g = 0; g < kk && pos < end; g++) {
        uint64_t g_end = pos + len[g];
        if (g_end > start) {
            if (pos >= start && g_end <= end) { /* the request covers it whole: straight into buf */
                if (read_group(st, fd, r, offs[g], len[g], crc[g], (unsigned char *)buf + (pos - start), cached) != 0)
                    return FELL_BACK_FAILED;
            } else { /* cut by the request: from a checked copy of the whole group */
                /* A large group cut by the kernel's 128 KiB reads would be read whole for each
                   of them (quadratic, and memory per concurrent read): the Python path checks
                   it once, in bounded pieces, and then serves ranges (pcrfs.store.reader). */
                if (len[g] > st->cut_limit) return FELL_BACK_DECLINED;
                uint64_t a = start > pos ? start : pos, b = end < g_end ? end : g_end;
                if (cut_piece(st, fd, r, i, g, offs[g], len[g], crc[g], cached, a - pos, b - a,
                              buf + (a - start)) != 0)
                    return FELL_BACK_FAILED;
            }
        }
        pos = g_end;
    }
    if (end > pos) { /* the request reaches into the EOI marker */
        uint64_t a = start > pos ? start : pos;
        memcpy(buf + (a - start), EOI + (a - pos), end - a);
    }
    return (int)(end - start);
}

/* The read callback's work on one State: bytes served into buf, or FELL_BACK_* (the
 * callback then asks Python). size <= INT_MAX. */
static int read_in(State *st, const char *path, char *buf, size_t size, off_t off) {
    View *v;
    uint64_t i;
    if (!st->reads_on || off < 0 || resolve(st, path, &v, &i) != 0) return FELL_BACK_UNRESOLVED;
    uint64_t r = record_of(st, i);
    int fd = take_fd(st, r);
    if (fd < 0) return FELL_BACK_NO_HOLDER; /* the Python read opens (or fetches) it and may hand us a descriptor */
    int n = serve(st, v, i, r, fd, buf, size, off);
    put_fd(st, r);
    if (n < 0) return n;
    if (n > 0) { /* as before prefixes: a read past the end is answered, not counted */
        ADD(st->fast_reads, 1);
        ADD(v->served, (uint64_t)n);
        if (off == 0) ADD(v->first_reads, 1);
    }
    return n;
}

/* The getattr callback's work on one State: 0 and *out filled if path is an image file. */
static int stat_in(State *st, const char *path, struct stat *out) {
    View *v;
    uint64_t i;
    ADD(st->lookups, 1);
    if (resolve(st, path, &v, &i) != 0) return -1;
    ADD(st->file_lookups, 1);
    unsigned kk = groups_served(st, v, i);
    const uint32_t *len = st->lengths + i * st->n_groups;
    uint64_t size = EOI_LEN;
    for (unsigned g = 0; g < kk; g++) size += len[g];
    int64_t t = mtime_of(st, i), sec = t / 1000000000, nsec = t % 1000000000;
    if (nsec < 0) { sec -= 1; nsec += 1000000000; } /* floor, like Python's divmod */
    memset(out, 0, sizeof *out);
    out->st_mode = FILE_MODE;
    out->st_ino = v->ino_base + i;
    out->st_nlink = 1;
    out->st_size = (off_t)size;
    out->st_uid = st->uid;
    out->st_gid = st->gid;
    out->st_blksize = 4096;
    out->st_blocks = (blkcnt_t)((size + 511) >> 9);
    out->st_atim.tv_sec = out->st_mtim.tv_sec = out->st_ctim.tv_sec = sec;
    out->st_atim.tv_nsec = out->st_mtim.tv_nsec = out->st_ctim.tv_nsec = nsec;
    return 0;
}

/* ---- the callbacks ------------------------------------------------------------------- */

/* The installed State for one callback (counted in flight until leave()), or NULL. */
static State *enter(void) {
    __atomic_fetch_add(&inflight, 1, __ATOMIC_SEQ_CST);
    State *st = __atomic_load_n(&installed, __ATOMIC_SEQ_CST);
    if (!st) __atomic_fetch_sub(&inflight, 1, __ATOMIC_SEQ_CST);
    return st;
}

static void leave(void) { __atomic_fetch_sub(&inflight, 1, __ATOMIC_SEQ_CST); }

static int fast_read(const char *path, char *buf, size_t size, off_t off, void *fi) {
    State *st = enter();
    if (!st) return -EIO; /* libfuse calls only while a State is installed */
    int n = size <= INT_MAX ? read_in(st, path, buf, size, off) : FELL_BACK_UNRESOLVED;
    if (n < 0) {
        ADD(st->fallback_reads, 1);
        n = st->py_read(path, buf, size, off, fi);
    }
    leave();
    return n;
}

static int fast_getattr(const char *path, struct stat *out, void *fi) {
    State *st = enter();
    if (!st) return -EIO;
    int rc = stat_in(st, path, out) == 0 ? 0 : st->py_getattr(path, out, fi);
    leave();
    return rc;
}

static int fast_getxattr(const char *path, const char *name, char *value, size_t size) {
    /* only pcrfs's own attributes exist (the stats, the fetch-ahead hints: ops.py); ls -l asks
       every file for ACLs and labels, answered here without the GIL */
    if (strncmp(name, PCRFS_XATTRS, sizeof PCRFS_XATTRS - 1) != 0) return -ENODATA;
    State *st = enter();
    if (!st) return -EIO;
    int rc = st->py_getxattr(path, name, value, size);
    leave();
    return rc;
}

/* Every ioctl on the mount. Python's open() (before 3.14) asks isatty (TCGETS) of each
 * file it opens, and the kernel forwards every ioctl to the filesystem, whatever it
 * answered before (fs/fuse/ioctl.c remembers no ENOSYS): on a re-read of a file the
 * kernel holds, this is the one request the daemon still gets. libfuse resolves the
 * path before calling here exactly as it does before answering ENOSYS without a
 * callback, so answering here costs nothing more, and the count shows in the stats
 * what a loader's opens cost (a reader that opens with buffering=0 or os.open sends
 * none). ENOTTY is what the kernel would have made of ENOSYS. */
static int fast_ioctl(const char *path, unsigned int cmd, void *arg, void *fi, unsigned int flags, void *data) {
    State *st = enter();
    if (st) {
        ADD(st->ioctls, 1);
        leave();
    }
    return -ENOTTY;
}

/* ---- the Python side ------------------------------------------------------------------ */

static PyObject *ContractError;

#define PTR(x) ((const void *)(uintptr_t)(x))
#define BUSY_ADD(st, v) __atomic_fetch_add(&(st)->busy, (v), __ATOMIC_SEQ_CST)

/* Until *count is 0 (the GIL released by the caller): usually a pread or two, so the
 * thread yields; past that (a Python fallback waiting on a remote store) it sleeps. */
static void wait_for_zero(uint64_t *count) {
    for (unsigned n = 0; __atomic_load_n(count, __ATOMIC_SEQ_CST) != 0; n++)
        n < 1000 ? sched_yield() : usleep(1000);
}

static void wait_for_zero32(uint32_t *count) {
    for (unsigned n = 0; __atomic_load_n(count, __ATOMIC_SEQ_CST) != 0; n++)
        n < 1000 ? sched_yield() : usleep(1000);
}

/* Take st out of libfuse's callbacks: once no callback uses it, drop the reference the
 * installed pointer held. 1 if it was installed. With the GIL. */
static int uninstall_state(State *st) {
    if (installed != st) return 0;
    __atomic_store_n(&installed, NULL, __ATOMIC_SEQ_CST);
    Py_BEGIN_ALLOW_THREADS
    wait_for_zero(&inflight);
    Py_END_ALLOW_THREADS
    Py_DECREF(st); /* the caller holds another */
    return 1;
}

/* Close the descriptors, let the buffers go and free the tables; counters stay. Neither
 * installed nor busy (see release). With the GIL. */
static void free_tables(State *st) {
    st->ready = 0;
    if (st->ckpts) {
        for (uint64_t r = 0; r < st->n_records; r++) free(st->ckpts[r]);
        free(st->ckpts);
    }
    if (st->fds) {
        for (uint64_t r = 0; r < st->n_records; r++) {
            if (st->fds[r] == MEM_SLOT) PyBuffer_Release(&st->bufs[r]);
            else if (st->fds[r] >= 0) close(st->fds[r]);
        }
        free(st->fds);
    }
    free(st->bufs);
    free(st->bases), free(st->held), free(st->cached), free(st->users);
    free(st->table);
    for (int c = 0; c < CUT_SLOTS; c++) free(st->cut[c].data), st->cut[c].data = NULL, st->cut[c].state = CUT_EMPTY;
    st->cut_bytes = 0;
    st->ckpts = NULL, st->fds = NULL, st->bufs = NULL, st->bases = NULL, st->held = NULL, st->cached = NULL;
    st->users = NULL, st->table = NULL;
    st->lengths = st->crcs = NULL, st->images = st->records = NULL, st->group_offsets = st->path_offsets = NULL;
    st->blob = NULL, st->positions = NULL, st->storage = NULL;
    for (int v = 0; v < st->n_views; v++) st->views[v].ks = NULL;
    for (size_t a = 0; a < sizeof st->arrays / sizeof st->arrays[0]; a++) PyBuffer_Release(&st->arrays[a]);
}

static void state_dealloc(State *st) { /* never installed here: the installed pointer holds a reference */
    free_tables(st);
    pthread_mutex_destroy(&st->cut_lock);
    pthread_cond_destroy(&st->cut_done);
    Py_TYPE(st)->tp_free((PyObject *)st);
}

/* ---- directory listings ---- */

/* libfuse 3's filler (fuse.h, fuse_fill_dir_t): 1 once its buffer for this request is full. */
typedef int (*fill_dir_cb)(void *, const char *, const struct stat *, off_t, int);

/* fill_dir(filler, buf, names, stats, start, end, flags, whole) -> the first position not
 * filled (end if every entry went in). The per-entry loop of pcrfs.fuse.ops's readdir:
 * entry pos is names[pos] (bytes) with the struct stat at stats + pos * sizeof(struct stat).
 * Paged (whole false): positions start..end-1 at offsets pos + 1 with `flags`, until the
 * filler says its buffer is full. Whole: offsets 0 and no flags (libfuse keeps the whole
 * listing and answers the kernel's next chunks itself); it stops only if the filler fails.
 * The names are taken with the GIL, the filler runs without it. */
static PyObject *fill_dir(PyObject *self, PyObject *args) {
    unsigned long long filler, buf, stats;
    PyObject *names;
    Py_ssize_t start, end;
    int flags, whole;
    if (!PyArg_ParseTuple(args, "KKO!KnnIp", &filler, &buf, &PyList_Type, &names, &stats, &start, &end, &flags,
                          &whole))
        return NULL;
    if (!filler || !stats || start < 0 || end < start || end > PyList_GET_SIZE(names)) {
        PyErr_SetString(PyExc_ValueError, "fill_dir: no filler or stats, or positions outside the names");
        return NULL;
    }
    Py_ssize_t n = end - start;
    const char **ptrs = PyMem_Malloc((size_t)(n ? n : 1) * sizeof *ptrs);
    if (!ptrs) return PyErr_NoMemory();
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *name = PyList_GET_ITEM(names, start + j);
        if (!PyBytes_Check(name)) {
            PyMem_Free(ptrs);
            PyErr_SetString(PyExc_TypeError, "fill_dir: names must be bytes");
            return NULL;
        }
        ptrs[j] = PyBytes_AS_STRING(name);
    }
    fill_dir_cb call = (fill_dir_cb)(uintptr_t)filler;
    const char *block = PTR(stats);
    Py_ssize_t pos = start;
    Py_BEGIN_ALLOW_THREADS
    for (; pos < end; pos++) {
        const struct stat *s = (const struct stat *)(block + (size_t)pos * sizeof(struct stat));
        if (call((void *)(uintptr_t)buf, ptrs[pos - start], s, whole ? 0 : (off_t)(pos + 1), whole ? 0 : flags))
            break;
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(ptrs);
    return PyLong_FromSsize_t(pos);
}

/* ---- configure(): the contract ---- */

/* dtype strings as numpy spells them for the types read here, on this host */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define LE_HOST 1
#else
#define LE_HOST 0
#endif

/* Whether a buffer format (struct syntax, one item) is an integer of this kind and size. */
static int format_is(const char *f, char kind, size_t size) {
    if (!f) f = "B";
    if (*f == '@' || *f == '=' || *f == '<' || *f == '>' || *f == '!') {
        int little = *f == '<' || ((*f == '@' || *f == '=') && LE_HOST);
        if (!little) return 0;
        f++;
    } else if (!LE_HOST) {
        return 0;
    }
    static const struct { char c, kind; size_t size; } codes[] = {
        {'B', 'u', 1}, {'b', 'i', 1}, {'H', 'u', sizeof(short)}, {'h', 'i', sizeof(short)},
        {'I', 'u', sizeof(int)}, {'i', 'i', sizeof(int)}, {'L', 'u', sizeof(long)}, {'l', 'i', sizeof(long)},
        {'Q', 'u', sizeof(long long)}, {'q', 'i', sizeof(long long)}, {'N', 'u', sizeof(size_t)},
        {'n', 'i', sizeof(Py_ssize_t)},
    };
    if (!f[0] || f[1]) return 0;
    for (size_t c = 0; c < sizeof codes / sizeof codes[0]; c++)
        if (codes[c].c == f[0]) return codes[c].kind == kind && codes[c].size == size;
    return 0;
}

/* Hold obj's buffer in slot as a C-contiguous array of count integers of this kind
 * and size ("<u4": 'u', 4); ContractError naming it if it is anything else. */
static const void *take_array(State *st, int slot, PyObject *obj, const char *name, char kind, size_t size,
                              uint64_t count) {
    Py_buffer *b = &st->arrays[slot];
    if (PyObject_GetBuffer(obj, b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        PyErr_Format(ContractError, "%s: %R is not a contiguous array", name, (PyObject *)Py_TYPE(obj));
        return NULL;
    }
    if (b->itemsize != (Py_ssize_t)size || !format_is(b->format, kind, size)) {
        PyErr_Format(ContractError, "%s holds '%s' items of %zd bytes; the compiled path reads %s%c%zu", name,
                     b->format ? b->format : "B", b->itemsize, size == 1 ? "|" : "<", kind, size);
        return NULL;
    }
    if ((uint64_t)b->len != count * size) {
        PyErr_Format(ContractError, "%s holds %zd bytes; the index's counts make %llu", name, b->len,
                     (unsigned long long)(count * size));
        return NULL;
    }
    return b->buf;
}

/* Hold a structured array (count items of whatever size) in slot; its item size or 0. */
static size_t take_rows(State *st, int slot, PyObject *obj, const char *name, uint64_t count, const void **out) {
    Py_buffer *b = &st->arrays[slot];
    if (PyObject_GetBuffer(obj, b, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        PyErr_Format(ContractError, "%s: %R is not a contiguous array", name, (PyObject *)Py_TYPE(obj));
        return 0;
    }
    if (b->itemsize <= 0 || (uint64_t)b->len != count * (uint64_t)b->itemsize) {
        PyErr_Format(ContractError, "%s holds %zd bytes in items of %zd; the index's counts make %llu items", name,
                     b->len, b->itemsize, (unsigned long long)count);
        return 0;
    }
    *out = b->buf;
    return (size_t)b->itemsize;
}

/* The offset of field `field` of a structured array whose fields are {name: (dtype.str,
 * offset)}, checked to be `want` (a dtype string) inside items of itemsize bytes; -1 and
 * ContractError if not. */
static Py_ssize_t field_offset(PyObject *fields, const char *array, const char *field, const char *want,
                               size_t size, size_t itemsize) {
    PyObject *entry = PyDict_GetItemString(fields, field);
    const char *got;
    Py_ssize_t off;
    if (!entry) {
        PyErr_Format(ContractError, "%s has no field %s", array, field);
        return -1;
    }
    if (!PyArg_ParseTuple(entry, "sn", &got, &off)) {
        PyErr_Clear();
        PyErr_Format(ContractError, "%s.%s: (dtype string, offset) expected, got %R", array, field, entry);
        return -1;
    }
    if (strcmp(got, want) != 0) {
        PyErr_Format(ContractError, "%s.%s is %s; the compiled path reads %s", array, field, got, want);
        return -1;
    }
    if (off < 0 || (size_t)off + size > itemsize) {
        PyErr_Format(ContractError, "%s.%s at offset %zd does not fit in items of %zu bytes", array, field, off,
                     itemsize);
        return -1;
    }
    return off;
}

/* The values the read path follows without bounds checks, checked once: NULL if all are
 * within bounds, else what is not. Without the GIL. */
static const char *out_of_bounds(const State *st, uint64_t blob_len) {
    uint64_t n = st->n_images, R = st->n_records;
    for (uint64_t i = 0; i < n; i++)
        if (st->path_offsets[i] > st->path_offsets[i + 1]) return "path offsets decrease";
    if (st->path_offsets[n] > blob_len) return "path offsets run past the path blob";
    for (uint64_t i = 0; i < n; i++)
        if (n_groups_of(st, i) > st->n_groups) return "an image has more groups than the store";
    if (n && !R) return "images but no records";
    if (R && record_first(st, 0) != 0) return "the first record does not start at position 0";
    for (uint64_t r = 0; r < R; r++) {
        uint64_t end = r + 1 < R ? record_first(st, r + 1) : n;
        if (record_first(st, r) > end || end > n) return "records' first positions decrease or pass the images";
    }
    if (!st->positions != !st->storage) return "positions without a storage order, or the reverse";
    if (st->storage) {
        for (uint64_t p = 0; p < n; p++)
            if (st->storage[p] >= n) return "the storage order names an image the store has not";
        for (uint64_t i = 0; i < n; i++)
            if (st->positions[i] < 0 || (uint64_t)st->positions[i] >= n ||
                st->storage[st->positions[i]] != i)
                return "positions are not the inverse of the storage order";
    }
    return NULL;
}

/* The path table: image i + 1 at the first free slot from its path's hash, in image
 * order. Almost all the time goes to cache misses on the slots (1.28M images: an 8 MiB
 * table), so the slots of a batch of paths are hashed and prefetched before any is
 * filled; the table is the one a plain loop in image order makes. */
#define TABLE_BATCH 32
static void build_table(State *st) {
    uint64_t slots[TABLE_BATCH];
    for (uint64_t i0 = 0; i0 < st->n_images; i0 += TABLE_BATCH) {
        uint64_t m = st->n_images - i0 < TABLE_BATCH ? st->n_images - i0 : TABLE_BATCH;
        for (uint64_t j = 0; j < m; j++) {
            uint64_t a = st->path_offsets[i0 + j], b = st->path_offsets[i0 + j + 1];
            slots[j] = hash_bytes(st->blob + a, b - a) & st->mask;
            __builtin_prefetch(&st->table[slots[j]], 1);
        }
        for (uint64_t j = 0; j < m; j++) {
            uint64_t slot = slots[j];
            while (st->table[slot]) slot = (slot + 1) & st->mask;
            st->table[slot] = (uint32_t)(i0 + j + 1);
        }
    }
}

static PyTypeObject StateType;

static PyObject *configure(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kw[] = {"n_images", "n_groups", "n_records", "lengths", "crcs", "images", "image_fields",
                         "records", "record_fields", "group_offsets", "blob", "path_offsets", "positions",
                         "storage", "views", "uid", "gid", "serve_reads", "cut_group_limit", "eoi", NULL};
    unsigned long long n, G, R, cut;
    PyObject *lengths, *crcs, *images, *image_fields, *records, *record_fields, *group_offsets, *blob,
        *path_offsets, *positions, *storage, *views;
    unsigned int uid, gid;
    int serve_reads;
    const char *eoi;
    Py_ssize_t eoi_len;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KKKOOOO!OO!OOOOOO!IIpKy#", kw, &n, &G, &R, &lengths, &crcs,
                                     &images, &PyDict_Type, &image_fields, &records, &PyDict_Type, &record_fields,
                                     &group_offsets, &blob, &path_offsets, &positions, &storage, &PyList_Type,
                                     &views, &uid, &gid, &serve_reads, &cut, &eoi, &eoi_len))
        return NULL;
    if (!zlib_crc32) {
        PyErr_SetString(PyExc_OSError, "libz.so.1 (zlib's crc32) not found");
        return NULL;
    }
    if (eoi_len != EOI_LEN || memcmp(eoi, EOI, EOI_LEN) != 0) {
        PyErr_SetString(ContractError, "the EOI marker Python appends is not the compiled path's FF D9");
        return NULL;
    }
    if (cut == 0 || cut > UINT32_MAX) {
        PyErr_Format(ContractError, "large-group cut of %llu bytes: 1..2^32-1 expected", cut);
        return NULL;
    }
    if (PyList_GET_SIZE(views) > MAX_VIEWS || n >= UINT32_MAX || G > MAX_GROUPS) {
        PyErr_SetString(PyExc_ValueError, "too many views, images or groups for the compiled path");
        return NULL;
    }
    State *st = (State *)StateType.tp_alloc(&StateType, 0);
    if (!st) return NULL;
    pthread_mutex_init(&st->cut_lock, NULL);
    pthread_cond_init(&st->cut_done, NULL);
    st->n_images = n, st->n_groups = G, st->n_records = R, st->cut_limit = cut;
    st->uid = uid, st->gid = gid, st->reads_on = serve_reads;
    const char *i8 = LE_HOST ? "<i8" : "?", *u8 = LE_HOST ? "<u8" : "?";
    Py_ssize_t off_mtime, off_ngroups, off_first;
    const void *p;
    if (!(st->lengths = take_array(st, ARR_LENGTHS, lengths, "group lengths", 'u', 4, n * G))) goto fail;
    if (!(st->crcs = take_array(st, ARR_CRCS, crcs, "group CRC-32s", 'u', 4, n * G))) goto fail;
    if (!(st->group_offsets = take_array(st, ARR_GROUP_OFFSETS, group_offsets, "record group offsets", 'u', 8,
                                         R * G)))
        goto fail;
    if (!(st->path_offsets = take_array(st, ARR_PATH_OFFSETS, path_offsets, "path offsets", 'u', 8, n + 1))) goto fail;
    if (PyObject_GetBuffer(blob, &st->arrays[ARR_BLOB], PyBUF_SIMPLE) < 0) goto fail;
    st->blob = st->arrays[ARR_BLOB].buf;
    if (!(st->image_size = take_rows(st, ARR_IMAGES, images, "images", n, &p))) goto fail;
    st->images = p;
    if ((off_mtime = field_offset(image_fields, "images", "src_mtime_ns", i8, 8, st->image_size)) < 0) goto fail;
    if ((off_ngroups = field_offset(image_fields, "images", "n_groups", "|u1", 1, st->image_size)) < 0) goto fail;
    if (!(st->record_size = take_rows(st, ARR_RECORDS, records, "records", R, &p))) goto fail;
    st->records = p;
    if ((off_first = field_offset(record_fields, "records", "first_image", u8, 8, st->record_size)) < 0) goto fail;
    st->off_mtime = (size_t)off_mtime, st->off_ngroups = (size_t)off_ngroups, st->off_first = (size_t)off_first;
    if ((positions == Py_None) != (storage == Py_None)) {
        PyErr_SetString(ContractError, "positions and the storage order go together");
        goto fail;
    }
    if (positions != Py_None) { /* format version 2 */
        if (!(st->positions = take_array(st, ARR_POSITIONS, positions, "positions", 'i', 8, n))) goto fail;
        if (!(st->storage = take_array(st, ARR_STORAGE, storage, "storage order", 'u', 8, n))) goto fail;
    }
    for (Py_ssize_t v = 0; v < PyList_GET_SIZE(views); v++) {
        const char *name;
        Py_ssize_t name_len;
        unsigned int k;
        unsigned long long ino_base;
        PyObject *ks;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(views, v), "y#IOK", &name, &name_len, &k, &ks, &ino_base)) goto fail;
        if (name_len >= VIEW_NAME_MAX) continue; /* served by Python */
        View *w = &st->views[st->n_views];
        if (ks != Py_None && !(w->ks = take_array(st, ARR_KS + st->n_views, ks, "an adaptive view's ks", 'u', 1, n)))
            goto fail;
        memcpy(w->name, name, (size_t)name_len);
        w->name_len = (size_t)name_len, w->k = k, w->ino_base = ino_base;
        st->n_views++;
    }
    const char *bad;
    Py_BEGIN_ALLOW_THREADS
    bad = out_of_bounds(st, (uint64_t)st->arrays[ARR_BLOB].len);
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_Format(ContractError, "index values out of bounds: %s", bad);
        goto fail;
    }
    uint64_t cap = 16;
    while (cap * 3 < n * 4 + 4) cap <<= 1; /* load factor <= 0.75 */
    st->table = calloc(cap, sizeof *st->table);
    st->ckpts = calloc(R ? R : 1, sizeof *st->ckpts);
    st->fds = malloc((R ? R : 1) * sizeof *st->fds);
    st->bases = calloc(R ? R : 1, sizeof *st->bases);
    st->held = calloc(R ? R : 1, sizeof *st->held);
    st->cached = calloc(R ? R : 1, sizeof *st->cached);
    st->users = calloc(R ? R : 1, sizeof *st->users);
    st->bufs = calloc(R ? R : 1, sizeof *st->bufs);
    if (!st->table || !st->ckpts || !st->fds || !st->bases || !st->held || !st->cached || !st->users || !st->bufs) {
        free(st->fds), st->fds = NULL; /* not yet -1: free_tables must not close them */
        PyErr_NoMemory();
        goto fail;
    }
    for (uint64_t r = 0; r < R; r++) st->fds[r] = -1;
    st->mask = cap - 1;
    Py_BEGIN_ALLOW_THREADS
    build_table(st);
    Py_END_ALLOW_THREADS
    st->ready = 1;
    return (PyObject *)st;
fail:
    Py_DECREF(st);
    return NULL;
}

/* ---- State methods ---- */

static int check_ready(State *st) {
    if (st->ready) return 0;
    PyErr_SetString(PyExc_RuntimeError, "this compiled path was released");
    return -1;
}

static PyObject *state_install(State *st, PyObject *args) {
    unsigned long long py_read, py_getattr, py_getxattr;
    if (!PyArg_ParseTuple(args, "KKK", &py_read, &py_getattr, &py_getxattr)) return NULL;
    if (check_ready(st) < 0) return NULL;
    if (!py_read || !py_getattr || !py_getxattr) {
        PyErr_SetString(PyExc_ValueError, "every Python callback is needed");
        return NULL;
    }
    if (installed) {
        PyErr_SetString(PyExc_RuntimeError, installed == st ? "already installed"
                                                            : "another mount's compiled path is installed");
        return NULL;
    }
    st->py_read = (read_cb)PTR(py_read), st->py_getattr = (getattr_cb)PTR(py_getattr);
    st->py_getxattr = (getxattr_cb)PTR(py_getxattr);
    Py_INCREF(st);
    __atomic_store_n(&installed, st, __ATOMIC_SEQ_CST);
    return Py_BuildValue("KKKK", (unsigned long long)(uintptr_t)fast_read,
                         (unsigned long long)(uintptr_t)fast_getattr, (unsigned long long)(uintptr_t)fast_getxattr,
                         (unsigned long long)(uintptr_t)fast_ioctl);
}

static PyObject *state_uninstall(State *st, PyObject *unused) { return PyBool_FromLong(uninstall_state(st)); }

/* Callers serialize adopt and revoke of a record (pcrfs.fuse.fastpath holds a lock): base,
 * held and cached are written while no descriptor is published and no reader uses one. */
static PyObject *state_adopt(State *st, PyObject *args) {
    unsigned long long r, base = 0;
    int fd, cached = 0;
    unsigned int held = 0xFFFF;
    PyObject *holder;
    if (!PyArg_ParseTuple(args, "KO|KIp", &r, &holder, &base, &held, &cached)) return NULL;
    if (!st->ready || r >= st->n_records || LOAD(st->fds[r]) >= 0 || LOAD(st->users[r]) != 0)
        Py_RETURN_FALSE; /* the caller keeps (and closes) fd */
    if (PyLong_Check(holder)) {
        fd = (int)PyLong_AsLong(holder);
        if (fd < 0 || fd == MEM_SLOT) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "not a descriptor");
            return NULL;
        }
    } else { /* a buffer (a record prefix in memory): held until revoked */
        if (PyObject_GetBuffer(holder, &st->bufs[r], PyBUF_SIMPLE) < 0) return NULL;
        fd = MEM_SLOT;
    }
    st->bases[r] = base;
    st->held[r] = (uint16_t)(held < st->n_groups ? held : st->n_groups);
    st->cached[r] = (uint8_t)cached;
    int expected = -1;
    if (!__atomic_compare_exchange_n(&st->fds[r], &expected, fd, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        if (fd == MEM_SLOT) PyBuffer_Release(&st->bufs[r]);
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

/* Take record r's descriptor back and close it once no read uses it; True if there was one. */
static PyObject *state_revoke(State *st, PyObject *args) {
    unsigned long long r;
    if (!PyArg_ParseTuple(args, "K", &r)) return NULL;
    if (!st->ready || r >= st->n_records) Py_RETURN_FALSE;
    int fd = __atomic_exchange_n(&st->fds[r], -1, __ATOMIC_SEQ_CST);
    if (fd < 0) Py_RETURN_FALSE;
    BUSY_ADD(st, 1); /* release() waits for us */
    Py_BEGIN_ALLOW_THREADS
    wait_for_zero32(&st->users[r]);
    if (fd != MEM_SLOT) close(fd);
    Py_END_ALLOW_THREADS
    if (fd == MEM_SLOT) PyBuffer_Release(&st->bufs[r]);
    BUSY_ADD(st, -1);
    Py_RETURN_TRUE;
}

static PyObject *state_has_fd(State *st, PyObject *args) {
    unsigned long long r;
    if (!PyArg_ParseTuple(args, "K", &r)) return NULL;
    return PyBool_FromLong(st->ready && r < st->n_records && LOAD(st->fds[r]) >= 0);
}

/* A group the Python path read and checked for a read that cut it, handed over so that the
 * reads of the rest of the file here do not read it again (the first reads of a record go
 * to Python until it hands the record over). Checked again here: what a slot holds is
 * always a copy whose CRC-32 this module computed. True if kept. */
static PyObject *state_adopt_cut(State *st, PyObject *args) {
    unsigned long long i;
    unsigned int g;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "KIy*", &i, &g, &data)) return NULL;
    int kept = 0;
    if (st->ready && i < st->n_images && g < st->n_groups) {
        uint32_t len = st->lengths[i * st->n_groups + g], crc = st->crcs[i * st->n_groups + g];
        unsigned char *copy = (uint64_t)data.len == len && len <= st->cut_limit ? malloc(len ? len : 1) : NULL;
        if (copy) {
            memcpy(copy, data.buf, len);
            if (crc32_of(copy, len) == crc) {
                pthread_mutex_lock(&st->cut_lock);
                CutSlot *c = cut_find(st, i, g) ? NULL : cut_victim(st, len);
                if (c) c->image = i, c->group = g, c->data = copy, c->state = CUT_READY,
                       c->used = ++st->cut_clock, copy = NULL, kept = 1;
                pthread_mutex_unlock(&st->cut_lock);
            }
            free(copy);
        }
    }
    PyBuffer_Release(&data);
    return PyBool_FromLong(kept);
}

static PyObject *state_read_for_test(State *st, PyObject *args) {
    const char *path;
    Py_ssize_t size;
    long long off;
    if (!PyArg_ParseTuple(args, "ynL", &path, &size, &off)) return NULL;
    if (check_ready(st) < 0) return NULL;
    if (size < 0 || size > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "size: 0..INT_MAX");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (!out) return NULL;
    int n;
    char *buf = PyBytes_AS_STRING(out);
    BUSY_ADD(st, 1);
    Py_BEGIN_ALLOW_THREADS
    n = read_in(st, path, buf, (size_t)size, (off_t)off);
    Py_END_ALLOW_THREADS
    BUSY_ADD(st, -1);
    if (n < 0) {
        Py_DECREF(out);
        return PyLong_FromLong(n);
    }
    if (n < size && _PyBytes_Resize(&out, n) < 0) return NULL;
    return out;
}

static PyObject *state_stat_for_test(State *st, PyObject *args) {
    const char *path;
    struct stat s;
    if (!PyArg_ParseTuple(args, "y", &path)) return NULL;
    if (check_ready(st) < 0) return NULL;
    if (stat_in(st, path, &s) != 0) return PyLong_FromLong(FELL_BACK_UNRESOLVED);
    return Py_BuildValue("{s:I,s:L,s:(Ll),s:(Ll),s:(Ll),s:K,s:I,s:I,s:I,s:L,s:I}", "mode", (unsigned)s.st_mode,
                         "size", (long long)s.st_size, "atime", (long long)s.st_atim.tv_sec, (long)s.st_atim.tv_nsec,
                         "mtime", (long long)s.st_mtim.tv_sec, (long)s.st_mtim.tv_nsec, "ctime",
                         (long long)s.st_ctim.tv_sec, (long)s.st_ctim.tv_nsec, "ino", (unsigned long long)s.st_ino,
                         "nlink", (unsigned)s.st_nlink, "uid", (unsigned)s.st_uid, "gid", (unsigned)s.st_gid,
                         "blocks", (long long)s.st_blocks, "blksize", (unsigned)s.st_blksize);
}

static PyObject *state_counters(State *st, PyObject *unused) {
    PyObject *views = PyDict_New();
    if (!views) return NULL;
    for (int v = 0; v < st->n_views; v++) {
        PyObject *row = Py_BuildValue("KK", (unsigned long long)LOAD(st->views[v].first_reads),
                                      (unsigned long long)LOAD(st->views[v].served));
        PyObject *key = PyUnicode_DecodeFSDefaultAndSize(st->views[v].name, (Py_ssize_t)st->views[v].name_len);
        if (!row || !key || PyDict_SetItem(views, key, row) < 0) {
            Py_XDECREF(row), Py_XDECREF(key), Py_DECREF(views);
            return NULL;
        }
        Py_DECREF(row), Py_DECREF(key);
    }
    return Py_BuildValue("{s:N,s:s,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "views", views, "crc32",
                         use_clmul ? "pclmul" : "zlib", "store_requests",
                         (unsigned long long)LOAD(st->store_requests), "store_bytes",
                         (unsigned long long)LOAD(st->store_bytes), "cache_reads",
                         (unsigned long long)LOAD(st->cache_reads), "cache_bytes",
                         (unsigned long long)LOAD(st->cache_bytes), "fast_reads", (unsigned long long)LOAD(st->fast_reads),
                         "fallback_reads", (unsigned long long)LOAD(st->fallback_reads), "lookups",
                         (unsigned long long)LOAD(st->lookups), "file_lookups", (unsigned long long)LOAD(st->file_lookups),
                         "ioctls", (unsigned long long)LOAD(st->ioctls));
}

static PyObject *state_release(State *st, PyObject *unused) {
    uninstall_state(st);
    st->ready = 0; /* no new read_for_test, adopt or revoke */
    Py_BEGIN_ALLOW_THREADS
    wait_for_zero32(&st->busy);
    Py_END_ALLOW_THREADS
    free_tables(st);
    Py_RETURN_NONE;
}

static PyMethodDef state_methods[] = {
    {"install", (PyCFunction)state_install, METH_VARARGS,
     "install(py_read, py_getattr, py_getxattr): libfuse's callbacks serve from this State (one per process); "
     "given the Python callbacks' addresses (the fallbacks), return the compiled read/getattr/getxattr/ioctl "
     "callbacks' addresses."},
    {"uninstall", (PyCFunction)state_uninstall, METH_NOARGS,
     "Take this State out of libfuse's callbacks once none is running; True if it was installed."},
    {"adopt", (PyCFunction)state_adopt, METH_VARARGS,
     "adopt(r, fd_or_buffer, base=0, held=all, cached=False): take a descriptor (a dup; True: it is ours "
     "to close) or a buffer (held until revoked) of record r's bytes from base on, groups 1..held."},
    {"revoke", (PyCFunction)state_revoke, METH_VARARGS,
     "Take record r's descriptor back and close it once no read uses it."},
    {"has_fd", (PyCFunction)state_has_fd, METH_VARARGS, "Whether record r has a descriptor here."},
    {"adopt_cut", (PyCFunction)state_adopt_cut, METH_VARARGS,
     "adopt_cut(image, group0, data): keep a copy of a group that a Python read cut (checked here again); "
     "True if kept."},
    {"read_for_test", (PyCFunction)state_read_for_test, METH_VARARGS,
     "read_for_test(path, size, offset) -> bytes | int: the read callback's own path (resolve, record, serve) "
     "without FUSE and without the Python fallback: the bytes served, or FELL_BACK_* (why Python would be asked)."},
    {"stat_for_test", (PyCFunction)state_stat_for_test, METH_VARARGS,
     "stat_for_test(path) -> dict | int: what the getattr callback answers for an image file, "
     "or FELL_BACK_UNRESOLVED."},
    {"counters", (PyCFunction)state_counters, METH_NOARGS, "What the compiled path served and read."},
    {"release", (PyCFunction)state_release, METH_NOARGS,
     "Uninstall, wait for calls in flight, close the descriptors, free the tables (after unmount)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject StateType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pcrfs.fuse._fastpath.State",
    .tp_basicsize = sizeof(State),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The compiled path configured for one mount (made by configure()).",
    .tp_dealloc = (destructor)state_dealloc,
    .tp_methods = state_methods,
};

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     "configure(n_images=, n_groups=, n_records=, lengths=, crcs=, images=, image_fields=, records=, "
     "record_fields=, group_offsets=, blob=, path_offsets=, positions=, storage=, views=, uid=, gid=, "
     "serve_reads=, cut_group_limit=, eoi=) -> State: the compiled path for one mounted tree, every array and "
     "constant checked against what this code reads (ContractError if not)."},
    {"fill_dir", fill_dir, METH_VARARGS,
     "fill_dir(filler, buf, names, stats, start, end, flags, whole) -> int: hand entries start..end-1 of a "
     "listing to libfuse's filler (paged, until its buffer is full, or whole); the first position not filled."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpath", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastpath(void) {
    void *z = dlopen("libz.so.1", RTLD_NOW | RTLD_LOCAL);
    zlib_crc32 = z ? (crc32_fn)dlsym(z, "crc32") : NULL;
    use_clmul = zlib_crc32 ? clmul_agrees_with_zlib() : 0;
    if (PyType_Ready(&StateType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    ContractError = PyErr_NewExceptionWithDoc("pcrfs.fuse._fastpath.ContractError",
                                              "An array or constant is not what the compiled path reads.",
                                              PyExc_ValueError, NULL);
    if (!ContractError || PyModule_AddObjectRef(m, "ContractError", ContractError) < 0 ||
        PyModule_AddObjectRef(m, "State", (PyObject *)&StateType) < 0 ||
        PyModule_AddIntConstant(m, "CONTRACT", CONTRACT) < 0 ||
        PyModule_AddIntConstant(m, "STAT_SIZE", (long)sizeof(struct stat)) < 0 ||
        PyModule_AddIntConstant(m, "FELL_BACK_UNRESOLVED", FELL_BACK_UNRESOLVED) < 0 ||
        PyModule_AddIntConstant(m, "FELL_BACK_NO_HOLDER", FELL_BACK_NO_HOLDER) < 0 ||
        PyModule_AddIntConstant(m, "FELL_BACK_DECLINED", FELL_BACK_DECLINED) < 0 ||
        PyModule_AddIntConstant(m, "FELL_BACK_FAILED", FELL_BACK_FAILED) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
