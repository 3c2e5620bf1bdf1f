/* The mount's compiled hot path: libfuse 3 high-level callbacks for image files.
 *
 * pcrfs.fuse.fastpath hands this module the store's memory-mapped index arrays
 * and puts read/getattr/getxattr/ioctl from here into the fuse_operations struct
 * in place of mfusepy's ctypes trampolines (ioctl had none: see fast_ioctl).
 * libfuse's worker threads then serve a file's lookup and read without the
 * interpreter (no GIL): path -> (view, image)
 * through a hash table of the index's paths, the image's scan groups located
 * through the index arrays, pread from record descriptors that LocalRecords opened
 * and checked (this module receives duplicates and never opens a file itself),
 * CRC-32 of every group before any of its bytes is served.
 *
 * A remote store's records are read here only as far as a cache holds them: a
 * record prefix (pcrfs.store.prefixfetch) in the memory cache (a buffer this module
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
 * No libfuse header is needed: the three callback signatures are libfuse 3's
 * (fuse.h, struct fuse_operations) and struct stat is the platform's. CRC-32 is
 * zlib's crc32, looked up in libz.so.1 at configure time (no zlib headers).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sched.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

typedef int (*read_cb)(const char *, char *, size_t, off_t, void *);
typedef int (*getattr_cb)(const char *, struct stat *, void *);
typedef int (*getxattr_cb)(const char *, const char *, char *, size_t);
typedef unsigned long (*crc32_fn)(unsigned long, const unsigned char *, unsigned int);

#define MAX_VIEWS 64
#define VIEW_NAME_MAX 32
#define CKPT_STRIDE 32 /* images between stored group offsets inside a record */
#define EOI_LEN 2
static const unsigned char EOI[EOI_LEN] = {0xFF, 0xD9}; /* JPEG end of image (ITU-T T.81, B.1.1.3) */
#define FILE_MODE (S_IFREG | 0444)
#define STATS_XATTR "user.pcrfs.stats"

typedef struct {
    char name[VIEW_NAME_MAX];
    size_t name_len;
    unsigned k;               /* groups served (fixed-k views) */
    const uint8_t *ks;        /* per-image groups (adaptive views), or NULL */
    uint64_t ino_base;        /* inode of image 0 in this view */
    uint64_t first_reads;     /* counters (atomic) */
    uint64_t served;
} View;

static struct {
    int ready;
    /* the index (numpy arrays owned by pcrfs.fuse.fastpath, alive while mounted) */
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
    crc32_fn crc32;
    read_cb py_read;
    getattr_cb py_getattr;
    getxattr_cb py_getxattr;
    /* counters (atomic) */
    uint64_t store_requests, store_bytes, cache_reads, cache_bytes, fast_reads, fallback_reads, file_lookups,
        lookups, ioctls;
} S;

#define MEM_SLOT 0x7fffffff /* fds[r]: record r is served from bufs[r], not a descriptor */
#define ADD(x, v) __atomic_fetch_add(&(x), (v), __ATOMIC_RELAXED)
#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_ACQUIRE)

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

static int use_clmul; /* set by configure() after the self-test */

/* zlib-compatible crc32(0, p, n). */
static uint32_t crc32_of(const unsigned char *p, size_t n) {
    uint32_t crc = 0;
#if defined(__x86_64__)
    if (use_clmul && n >= CLMUL_MIN) {
        size_t bulk = n & ~(size_t)15;
        crc = ~crc_fold(p, bulk, ~crc);
        p += bulk;
        n -= bulk;
    }
#endif
    unsigned long acc = crc;
    while (n) { /* zlib's length argument is an unsigned int */
        unsigned int step = n > (1u << 30) ? (1u << 30) : (unsigned int)n;
        acc = S.crc32(acc, p, step);
        p += step;
        n -= step;
    }
    return (uint32_t)acc;
}

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
    use_clmul = 1;
    for (size_t n = 0; n <= N && ok; n += (n < 300 ? 1 : 97)) {
        for (size_t start = 0; start < 3 && start + n <= N; start++) {
            uint32_t want = (uint32_t)S.crc32(0, buf + start, (unsigned int)n);
            if (crc32_of(buf + start, n) != want) {
                ok = 0;
                break;
            }
        }
    }
    use_clmul = 0;
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

static int64_t find_image(const char *rel, size_t n) {
    uint64_t slot = hash_bytes((const unsigned char *)rel, n) & S.mask;
    for (;;) {
        uint32_t v = S.table[slot];
        if (v == 0) return -1;
        uint64_t i = v - 1;
        uint64_t a = S.path_offsets[i], b = S.path_offsets[i + 1];
        if (b - a == n && memcmp(S.blob + a, rel, n) == 0) return (int64_t)i;
        slot = (slot + 1) & S.mask;
    }
}

static unsigned n_groups_of(uint64_t i) { return (unsigned char)S.images[i * S.image_size + S.off_ngroups]; }

static int64_t mtime_of(uint64_t i) {
    int64_t t;
    memcpy(&t, S.images + i * S.image_size + S.off_mtime, sizeof t);
    return t;
}

static uint64_t record_first(uint64_t r) {
    uint64_t v;
    memcpy(&v, S.records + r * S.record_size + S.off_first, sizeof v);
    return v;
}

static uint64_t position_of(uint64_t i) { return S.positions ? (uint64_t)S.positions[i] : i; }
static uint64_t image_at(uint64_t p) { return S.storage ? S.storage[p] : p; }

static uint64_t record_of(uint64_t i) { /* the last record whose first position is <= i's */
    uint64_t lo = 0, hi = S.n_records, p = position_of(i);
    while (hi - lo > 1) {
        uint64_t mid = (lo + hi) / 2;
        if (record_first(mid) <= p) lo = mid; else hi = mid;
    }
    return lo;
}

/* Group offsets of every CKPT_STRIDE-th image of record r (group-major layout: group g
 * of image j starts after group g of the record's images before j). Built on first use
 * by whichever thread needs it; a racing second build is freed. */
static const uint64_t *checkpoints(uint64_t r) {
    uint64_t *ck = __atomic_load_n(&S.ckpts[r], __ATOMIC_ACQUIRE);
    if (ck) return ck;
    uint64_t first = record_first(r);
    uint64_t end = r + 1 < S.n_records ? record_first(r + 1) : S.n_images;
    uint64_t G = S.n_groups, count = end - first, rows = count / CKPT_STRIDE + 1;
    ck = malloc(rows * G * sizeof *ck);
    if (!ck) return NULL;
    uint64_t cur[256];
    const uint64_t *base = S.group_offsets + r * G;
    for (uint64_t g = 0; g < G; g++) cur[g] = base[g];
    memcpy(ck, cur, G * sizeof *cur);
    for (uint64_t j = 0; j < count; j++) {
        if (j % CKPT_STRIDE == 0) memcpy(ck + (j / CKPT_STRIDE) * G, cur, G * sizeof *cur);
        const uint32_t *len = S.lengths + image_at(first + j) * G;
        for (uint64_t g = 0; g < G; g++) cur[g] += len[g];
    }
    uint64_t *expected = NULL;
    if (!__atomic_compare_exchange_n(&S.ckpts[r], &expected, ck, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        free(ck);
        return expected;
    }
    return ck;
}

/* Offsets of groups 0..kk-1 of image i (in record r) into out. */
static int group_offsets(uint64_t i, uint64_t r, unsigned kk, uint64_t *out) {
    const uint64_t *ck = checkpoints(r);
    if (!ck) return -1;
    uint64_t G = S.n_groups, first = record_first(r), p = position_of(i), j = p - first;
    uint64_t row = j / CKPT_STRIDE, from = first + row * CKPT_STRIDE;
    for (unsigned g = 0; g < kk; g++) out[g] = ck[row * G + g];
    for (uint64_t m = from; m < p; m++) {
        const uint32_t *len = S.lengths + image_at(m) * G;
        for (unsigned g = 0; g < kk; g++) out[g] += len[g];
    }
    return 0;
}

/* "/view/rel/path" -> view and image; 0 if it names an image file. */
static int resolve(const char *path, View **view, uint64_t *image) {
    if (!path || path[0] != '/') return -1;
    const char *name = path + 1, *slash = strchr(name, '/');
    if (!slash) return -1;
    size_t n = (size_t)(slash - name);
    for (int v = 0; v < S.n_views; v++) {
        if (S.views[v].name_len == n && memcmp(S.views[v].name, name, n) == 0) {
            int64_t i = find_image(slash + 1, strlen(slash + 1));
            if (i < 0) return -1;
            *view = &S.views[v];
            *image = (uint64_t)i;
            return 0;
        }
    }
    return -1;
}

static unsigned groups_served(const View *v, uint64_t i) {
    unsigned k = v->ks ? v->ks[i] : v->k, n = n_groups_of(i);
    return k < n ? k : n;
}

/* ---- the callbacks ------------------------------------------------------------------- */

static int fast_getattr(const char *path, struct stat *st, void *fi) {
    View *v;
    uint64_t i;
    ADD(S.lookups, 1);
    if (resolve(path, &v, &i) != 0) return S.py_getattr(path, st, fi);
    ADD(S.file_lookups, 1);
    unsigned kk = groups_served(v, i);
    const uint32_t *len = S.lengths + i * S.n_groups;
    uint64_t size = EOI_LEN;
    for (unsigned g = 0; g < kk; g++) size += len[g];
    int64_t t = mtime_of(i), sec = t / 1000000000, nsec = t % 1000000000;
    if (nsec < 0) { sec -= 1; nsec += 1000000000; } /* floor, like Python's divmod */
    memset(st, 0, sizeof *st);
    st->st_mode = FILE_MODE;
    st->st_ino = v->ino_base + i;
    st->st_nlink = 1;
    st->st_size = (off_t)size;
    st->st_uid = S.uid;
    st->st_gid = S.gid;
    st->st_blksize = 4096;
    st->st_blocks = (blkcnt_t)((size + 511) >> 9);
    st->st_atim.tv_sec = st->st_mtim.tv_sec = st->st_ctim.tv_sec = sec;
    st->st_atim.tv_nsec = st->st_mtim.tv_nsec = st->st_ctim.tv_nsec = nsec;
    return 0;
}

static int fast_getxattr(const char *path, const char *name, char *value, size_t size) {
    /* only the stats attribute exists; ls -l asks every file for ACLs and labels */
    if (strcmp(name, STATS_XATTR) == 0) return S.py_getxattr(path, name, value, size);
    return -ENODATA;
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
    ADD(S.ioctls, 1);
    return -ENOTTY;
}

/* One verified group into dst: pread (or a copy from record r's buffer), then CRC-32;
 * nonzero on any failure. */
static int read_group(int fd, uint64_t r, uint64_t offset, uint32_t length, uint32_t crc, unsigned char *dst,
                      int cached) {
    size_t got = 0;
    if (fd == MEM_SLOT) {
        const Py_buffer *b = &S.bufs[r];
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
        ADD(S.cache_reads, 1);
        ADD(S.cache_bytes, length);
    } else {
        ADD(S.store_requests, 1);
        ADD(S.store_bytes, length);
    }
    return crc32_of(dst, length) == crc ? 0 : -1;
}

/* Record r's descriptor for one read, or -1; a descriptor returned must be put back
 * with put_fd. Sequentially consistent on both sides (here: count, then load; revoke:
 * exchange, then wait for the count), so revoke never closes one a reader holds. */
static int take_fd(uint64_t r) {
    __atomic_fetch_add(&S.users[r], 1, __ATOMIC_SEQ_CST);
    int fd = __atomic_load_n(&S.fds[r], __ATOMIC_SEQ_CST);
    if (fd < 0) __atomic_fetch_sub(&S.users[r], 1, __ATOMIC_SEQ_CST);
    return fd;
}

static void put_fd(uint64_t r) { __atomic_fetch_sub(&S.users[r], 1, __ATOMIC_SEQ_CST); }

#define CUT_GROUP_LIMIT (1u << 20) /* bytes: larger groups cut by a read go to Python */

/* Bytes [off, off + size) of image i in view v from record r's descriptor fd (holding the
 * record from base on, groups 1..held); -1: let Python serve it. */
static int serve(View *v, uint64_t i, uint64_t r, int fd, char *buf, size_t size, off_t off) {
    unsigned kk = groups_served(v, i);
    if (kk > S.held[r]) return -1; /* a record prefix with fewer groups than this view needs */
    uint64_t base = S.bases[r];
    int cached = S.cached[r];
    const uint32_t *len = S.lengths + i * S.n_groups, *crc = S.crcs + i * S.n_groups;
    uint64_t offs[256];
    if (kk > 256 || group_offsets(i, r, kk, offs) != 0) return -1;
    for (unsigned g = 0; g < kk; g++) {
        if (offs[g] < base) return -1;
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
                if (read_group(fd, r, offs[g], len[g], crc[g], (unsigned char *)buf + (pos - start), cached) != 0)
                    return -1;
            } else { /* cut by the request: the whole group, to check it, then the part asked for */
                /* A large group cut by the kernel's 128 KiB reads would be read whole for each
                   of them (quadratic, and memory per concurrent read): the Python path checks
                   it once, in bounded pieces, and then serves ranges (pcrfs.store.reader). */
                if (len[g] > CUT_GROUP_LIMIT) return -1;
                unsigned char *tmp = malloc(len[g] ? len[g] : 1);
                if (!tmp) return -1;
                if (read_group(fd, r, offs[g], len[g], crc[g], tmp, cached) != 0) {
                    free(tmp);
                    return -1;
                }
                uint64_t a = start > pos ? start : pos, b = end < g_end ? end : g_end;
                memcpy(buf + (a - start), tmp + (a - pos), b - a);
                free(tmp);
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

static int fast_read(const char *path, char *buf, size_t size, off_t off, void *fi) {
    View *v;
    uint64_t i;
    if (!S.reads_on || off < 0 || resolve(path, &v, &i) != 0) goto fallback;
    uint64_t r = record_of(i);
    int fd = take_fd(r);
    if (fd < 0) goto fallback; /* the Python read opens (or fetches) it and may hand us a descriptor */
    int n = serve(v, i, r, fd, buf, size, off);
    put_fd(r);
    if (n < 0) goto fallback;
    if (n > 0) { /* as before prefixes: a read past the end is answered, not counted */
        ADD(S.fast_reads, 1);
        ADD(v->served, (uint64_t)n);
        if (off == 0) ADD(v->first_reads, 1);
    }
    return n;
fallback:
    ADD(S.fallback_reads, 1);
    return S.py_read(path, buf, size, off, fi);
}

/* ---- the Python side ------------------------------------------------------------------ */

static void release_all(void) {
    if (S.ckpts) {
        for (uint64_t r = 0; r < S.n_records; r++) free(S.ckpts[r]);
        free(S.ckpts);
    }
    if (S.fds) {
        for (uint64_t r = 0; r < S.n_records; r++) {
            if (S.fds[r] == MEM_SLOT) PyBuffer_Release(&S.bufs[r]);
            else if (S.fds[r] >= 0) close(S.fds[r]);
        }
        free(S.fds);
    }
    free(S.bufs);
    free(S.bases), free(S.held), free(S.cached), free(S.users);
    free(S.table);
    memset(&S, 0, sizeof S);
}

#define PTR(x) ((const void *)(uintptr_t)(x))

static PyObject *configure(PyObject *self, PyObject *args) {
    unsigned long long n, G, R, lengths, crcs, images, image_size, off_mtime, off_ngroups, records, record_size,
        off_first, group_offsets_p, blob, path_offsets, positions, storage;
    unsigned int uid, gid;
    PyObject *views;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKKKKKKKKKIIO!", &n, &G, &R, &lengths, &crcs, &images, &image_size,
                          &off_mtime, &off_ngroups, &records, &record_size, &off_first, &group_offsets_p, &blob,
                          &path_offsets, &positions, &storage, &uid, &gid, &PyList_Type, &views))
        return NULL;
    release_all();
    void *z = dlopen("libz.so.1", RTLD_NOW | RTLD_LOCAL);
    crc32_fn crc = z ? (crc32_fn)dlsym(z, "crc32") : NULL;
    if (!crc) {
        PyErr_SetString(PyExc_OSError, "libz.so.1 (zlib's crc32) not found");
        return NULL;
    }
    if (PyList_GET_SIZE(views) > MAX_VIEWS || n >= UINT32_MAX || G > 256) {
        PyErr_SetString(PyExc_ValueError, "too many views or images for the compiled path");
        return NULL;
    }
    S.crc32 = crc;
    use_clmul = clmul_agrees_with_zlib();
    S.n_images = n, S.n_groups = G, S.n_records = R;
    S.lengths = PTR(lengths), S.crcs = PTR(crcs), S.images = PTR(images);
    S.image_size = image_size, S.off_mtime = off_mtime, S.off_ngroups = off_ngroups;
    S.records = PTR(records), S.record_size = record_size, S.off_first = off_first;
    S.group_offsets = PTR(group_offsets_p), S.blob = PTR(blob), S.path_offsets = PTR(path_offsets);
    S.positions = positions ? PTR(positions) : NULL, S.storage = storage ? PTR(storage) : NULL;
    S.uid = uid, S.gid = gid;
    for (Py_ssize_t v = 0; v < PyList_GET_SIZE(views); v++) {
        const char *name;
        Py_ssize_t name_len;
        unsigned int k;
        unsigned long long ks, ino_base;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(views, v), "y#IKK", &name, &name_len, &k, &ks, &ino_base))
            return NULL;
        if (name_len >= VIEW_NAME_MAX) continue; /* served by Python */
        View *w = &S.views[S.n_views++];
        memcpy(w->name, name, (size_t)name_len);
        w->name_len = (size_t)name_len, w->k = k, w->ks = PTR(ks), w->ino_base = ino_base;
    }
    uint64_t cap = 16;
    while (cap * 3 < n * 4 + 4) cap <<= 1; /* load factor <= 0.75 */
    S.table = calloc(cap, sizeof *S.table);
    S.ckpts = calloc(R ? R : 1, sizeof *S.ckpts);
    S.fds = malloc((R ? R : 1) * sizeof *S.fds);
    S.bases = calloc(R ? R : 1, sizeof *S.bases);
    S.held = calloc(R ? R : 1, sizeof *S.held);
    S.cached = calloc(R ? R : 1, sizeof *S.cached);
    S.users = calloc(R ? R : 1, sizeof *S.users);
    S.bufs = calloc(R ? R : 1, sizeof *S.bufs);
    if (!S.table || !S.ckpts || !S.fds || !S.bases || !S.held || !S.cached || !S.users || !S.bufs) {
        release_all();
        return PyErr_NoMemory();
    }
    for (uint64_t r = 0; r < R; r++) S.fds[r] = -1;
    S.mask = cap - 1;
    Py_BEGIN_ALLOW_THREADS
    for (uint64_t i = 0; i < n; i++) {
        uint64_t a = S.path_offsets[i], b = S.path_offsets[i + 1];
        uint64_t slot = hash_bytes(S.blob + a, b - a) & S.mask;
        while (S.table[slot]) slot = (slot + 1) & S.mask;
        S.table[slot] = (uint32_t)(i + 1);
    }
    Py_END_ALLOW_THREADS
    S.ready = 1;
    Py_RETURN_NONE;
}

static PyObject *install(PyObject *self, PyObject *args) {
    unsigned long long py_read, py_getattr, py_getxattr;
    int reads_on;
    if (!PyArg_ParseTuple(args, "KKKp", &py_read, &py_getattr, &py_getxattr, &reads_on)) return NULL;
    if (!S.ready || !py_read || !py_getattr || !py_getxattr) {
        PyErr_SetString(PyExc_RuntimeError, "configure() first, with every Python callback");
        return NULL;
    }
    S.py_read = (read_cb)PTR(py_read), S.py_getattr = (getattr_cb)PTR(py_getattr);
    S.py_getxattr = (getxattr_cb)PTR(py_getxattr), S.reads_on = reads_on;
    return Py_BuildValue("KKKK", (unsigned long long)(uintptr_t)fast_read,
                         (unsigned long long)(uintptr_t)fast_getattr, (unsigned long long)(uintptr_t)fast_getxattr,
                         (unsigned long long)(uintptr_t)fast_ioctl);
}

/* Callers serialize adopt and revoke of a record (pcrfs.fuse.fastpath holds a lock): base,
 * held and cached are written while no descriptor is published and no reader uses one. */
static PyObject *adopt(PyObject *self, PyObject *args) {
    unsigned long long r, base = 0;
    int fd, cached = 0;
    unsigned int held = 0xFFFF;
    PyObject *holder;
    if (!PyArg_ParseTuple(args, "KO|KIp", &r, &holder, &base, &held, &cached)) return NULL;
    if (!S.ready || r >= S.n_records || LOAD(S.fds[r]) >= 0 || LOAD(S.users[r]) != 0)
        Py_RETURN_FALSE; /* the caller keeps (and closes) fd */
    if (PyLong_Check(holder)) {
        fd = (int)PyLong_AsLong(holder);
        if (fd < 0 || fd == MEM_SLOT) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "not a descriptor");
            return NULL;
        }
    } else { /* a buffer (a record prefix in memory): held until revoked */
        if (PyObject_GetBuffer(holder, &S.bufs[r], PyBUF_SIMPLE) < 0) return NULL;
        fd = MEM_SLOT;
    }
    S.bases[r] = base;
    S.held[r] = (uint16_t)(held < S.n_groups ? held : S.n_groups);
    S.cached[r] = (uint8_t)cached;
    int expected = -1;
    if (!__atomic_compare_exchange_n(&S.fds[r], &expected, fd, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        if (fd == MEM_SLOT) PyBuffer_Release(&S.bufs[r]);
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

/* Take record r's descriptor back and close it once no read uses it; True if there was one. */
static PyObject *revoke_fd(PyObject *self, PyObject *args) {
    unsigned long long r;
    if (!PyArg_ParseTuple(args, "K", &r)) return NULL;
    if (!S.ready || r >= S.n_records) Py_RETURN_FALSE;
    int fd = __atomic_exchange_n(&S.fds[r], -1, __ATOMIC_SEQ_CST);
    if (fd < 0) Py_RETURN_FALSE;
    Py_BEGIN_ALLOW_THREADS
    while (__atomic_load_n(&S.users[r], __ATOMIC_SEQ_CST) != 0) sched_yield(); /* a pread or two */
    if (fd != MEM_SLOT) close(fd);
    Py_END_ALLOW_THREADS
    if (fd == MEM_SLOT) PyBuffer_Release(&S.bufs[r]);
    Py_RETURN_TRUE;
}

static PyObject *has_fd(PyObject *self, PyObject *args) {
    unsigned long long r;
    if (!PyArg_ParseTuple(args, "K", &r)) return NULL;
    return PyBool_FromLong(S.ready && r < S.n_records && LOAD(S.fds[r]) >= 0);
}

static PyObject *counters(PyObject *self, PyObject *unused) {
    PyObject *views = PyDict_New();
    if (!views) return NULL;
    for (int v = 0; v < S.n_views; v++) {
        PyObject *row = Py_BuildValue("KK", (unsigned long long)LOAD(S.views[v].first_reads),
                                      (unsigned long long)LOAD(S.views[v].served));
        PyObject *key = PyUnicode_DecodeFSDefaultAndSize(S.views[v].name, (Py_ssize_t)S.views[v].name_len);
        if (!row || !key || PyDict_SetItem(views, key, row) < 0) {
            Py_XDECREF(row), Py_XDECREF(key), Py_DECREF(views);
            return NULL;
        }
        Py_DECREF(row), Py_DECREF(key);
    }
    return Py_BuildValue("{s:N,s:s,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "views", views, "crc32",
                         use_clmul ? "pclmul" : "zlib", "store_requests",
                         (unsigned long long)LOAD(S.store_requests), "store_bytes",
                         (unsigned long long)LOAD(S.store_bytes), "cache_reads",
                         (unsigned long long)LOAD(S.cache_reads), "cache_bytes",
                         (unsigned long long)LOAD(S.cache_bytes), "fast_reads", (unsigned long long)LOAD(S.fast_reads),
                         "fallback_reads", (unsigned long long)LOAD(S.fallback_reads), "lookups",
                         (unsigned long long)LOAD(S.lookups), "file_lookups", (unsigned long long)LOAD(S.file_lookups),
                         "ioctls", (unsigned long long)LOAD(S.ioctls));
}

static PyObject *release(PyObject *self, PyObject *unused) {
    release_all();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "Point the compiled path at a store's index arrays and views."},
    {"install", install, METH_VARARGS,
     "Given the Python read/getattr/getxattr callbacks' addresses and whether to serve reads, "
     "return the compiled read/getattr/getxattr/ioctl callbacks' addresses."},
    {"adopt", adopt, METH_VARARGS,
     "adopt(r, fd_or_buffer, base=0, held=all, cached=False): take a descriptor (a dup; True: it is ours "
     "to close) or a buffer (held until revoked) of record r's bytes from base on, groups 1..held."},
    {"revoke", revoke_fd, METH_VARARGS, "Take record r's descriptor back and close it once no read uses it."},
    {"has_fd", has_fd, METH_VARARGS, "Whether record r has a descriptor here."},
    {"counters", counters, METH_NOARGS, "What the compiled path served and read."},
    {"release", release, METH_NOARGS, "Close the descriptors and free the tables (after unmount)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpath", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastpath(void) { return PyModule_Create(&module); }
