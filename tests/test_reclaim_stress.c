/*
 * Pure-C stress test of reclamation (csrc/epoch.c, arena.c, block.c) against lock-free readers,
 * built and run by tests/test_c_stress.py under ThreadSanitizer and under ASan+UBSan.
 *
 * One owner thread writes a sliding window of series into consecutive blocks (a third of the
 * series are new each block: churn), and after each block seals, encodes, releases the
 * previous one, expires the series that went idle and reclaims; so chunks, labels and slots
 * are reused all the time. Reader threads, each in its own reader slot, walk every live slot
 * inside read sections (slots, labels, chunk chains), decode every series and check that each
 * sample's value is the one its series' labels and timestamp imply (v = ts + id * 2^32): a
 * chunk or label block reused under a reader would show up as a wrong value, a decode error
 * or, under TSan, as a race between the owner's plain writes to reused memory and the
 * reader's plain reads. One reader also encodes sealed blocks (m3_block_encode) and decodes
 * the result. Exit status 0 = pass.
 */
#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>

#include "seg_int.h" /* includes m3shm.h */

#define READERS 3
#define BLOCKS 60
#define WINDOW 96      /* series written per block */
#define CHURN 32       /* of which new each block */
#define PER_BLOCK 120  /* samples per series per block */
#define BLOCK_MS 100000

static uint8_t *seg;
static int owner_done;
static uint64_t checked[READERS + 1];
static uint64_t backpressure; /* applies refused for a full arena, then retried (owner only) */

static void fail(const char *what, long a, long b)
{
    fprintf(stderr, "FAIL: %s (%ld, %ld)\n", what, a, b);
    exit(1);
}

static uint32_t labels_of(uint32_t id, uint8_t *out)
{
    char val[16];
    int vl = snprintf(val, sizeof val, "s%u", id);
    uint32_t n = 0;
    out[n++] = 8, out[n++] = 0;
    memcpy(out + n, "__name__", 8), n += 8;
    out[n++] = (uint8_t)vl, out[n++] = 0;
    memcpy(out + n, val, (size_t)vl), n += (uint32_t)vl;
    return n;
}

static uint32_t id_of(const uint8_t *labels, uint32_t len)
{
    if (len < 14 || labels[12] != 's')
        fail("labels", len, 0);
    uint32_t id = 0;
    for (uint32_t i = 13; i < len; i++)
        id = id * 10 + (uint32_t)(labels[i] - '0');
    return id;
}

static double value_of(uint32_t id, int64_t ts) { return (double)ts + (double)id * 4294967296.0; }

static void put(uint32_t id, int64_t t0)
{
    static uint8_t buf[sizeof(m3_rec) + 64 + PER_BLOCK * 16];
    m3_rec *r = (m3_rec *)buf;
    memset(buf, 0, sizeof buf);
    uint8_t *l = (uint8_t *)(r + 1);
    uint32_t ll = labels_of(id, l);
    r->len = (uint32_t)rec_bytes(ll, PER_BLOCK);
    r->type = M3_REC_SAMPLES;
    r->vtype = M3_VT_FLOAT;
    r->hash = m3_labels_hash(l, ll);
    r->nsamples = PER_BLOCK;
    r->labels_len = ll;
    r->nlabels = 1;
    int64_t *ts = (int64_t *)(l + round8(ll));
    double *v = (double *)(ts + PER_BLOCK);
    for (int j = 0; j < PER_BLOCK; j++) {
        ts[j] = t0 + j * 500;
        v[j] = value_of(id, ts[j]);
    }
    int rc;
    for (int tries = 0; (rc = m3_shard_apply(seg, r)) == M3_ENOSPC; tries++) {
        /* The arena is full of chunks that readers still pin (a loaded machine keeps them in
           their sections longer): what the daemon's admission answers with backpressure.
           Wait for the readers to move on, as a producer retrying after a 503 would. */
        if (tries > 200000)
            fail("apply: arena never freed", id, t0);
        backpressure++;
        m3_shard_reclaim(seg, 0);
        sched_yield();
    }
    if (rc != M3_OK)
        fail("apply", rc, id);
}

static void *owner(void *arg)
{
    (void)arg;
    m3_flush_entry idx[64];
    static uint8_t out[1 << 16];
    for (int k = 0; k < BLOCKS; k++) {
        int64_t bs = (int64_t)k * BLOCK_MS;
        for (uint32_t i = 0; i < WINDOW; i++)
            put((uint32_t)k * CHURN + i, bs);
        if (!k)
            continue;
        int64_t prev = bs - BLOCK_MS;
        if (m3_block_seal(seg, 0, prev, M3_BLK_WARM) <= 0)
            fail("seal", k, 0);
        uint32_t cursor = 0;
        size_t used, n, total = 0;
        int rc;
        do {
            rc = m3_block_encode(seg, 0, prev, M3_BLK_WARM, &cursor, out, sizeof out, &used,
                                 idx, 64, &n);
            if (rc < 0)
                fail("encode", rc, k);
            total += n;
        } while (rc == 1);
        if (total != WINDOW)
            fail("encoded series", (long)total, k);
        if (m3_block_release(seg, 0, prev, M3_BLK_WARM) <= 0)
            fail("release", k, 0);
        m3_shard_expire_series(seg, 0, bs);
        m3_shard_reclaim(seg, 0);
    }
    __atomic_store_n(&owner_done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void check_samples(uint32_t id, const int64_t *ts, const double *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (v[i] != value_of(id, ts[i]))
            fail("value from another series", (long)id, (long)ts[i]);
        if (i && ts[i] <= ts[i - 1])
            fail("order", (long)id, (long)ts[i]);
    }
}

static void *reader(void *arg)
{
    uint32_t me = (uint32_t)(uintptr_t)arg, rs;
    if (m3_reader_claim(seg, &rs) != M3_OK)
        fail("claim", me, 0);
    size_t cap = 4096;
    int64_t *ts = malloc(cap * sizeof *ts);
    double *v = malloc(cap * sizeof *v);
    while (!__atomic_load_n(&owner_done, __ATOMIC_ACQUIRE)) {
        m3_read_begin(seg, rs);
        uint32_t ns = m3_shard_nseries(seg, 0);
        for (uint32_t slot = 0; slot < ns; slot++) {
            m3_series_info info;
            if (m3_series_get(seg, 0, slot, &info) != M3_OK)
                continue;
            uint32_t id = id_of(info.labels, info.labels_len);
            size_t n = 0;
            int rc;
            while ((rc = m3_series_read(seg, 0, slot, INT64_MIN, INT64_MAX, ts, v, cap, &n)) ==
                   M3_ENOSPC) {
                cap *= 2;
                ts = realloc(ts, cap * sizeof *ts);
                v = realloc(v, cap * sizeof *v);
            }
            if (rc == M3_ENOENT)
                continue; /* expired between get and read: the section keeps its memory from
                             reuse, not the series alive */
            if (rc != M3_OK)
                fail("read", rc, slot);
            check_samples(id, ts, v, n);
            checked[me] += n;
            if (slot % 16 == 0)
                sched_yield(); /* stay in the section while the owner moves on */
        }
        m3_read_end(seg, rs);
    }
    m3_reader_release(seg, rs);
    free(ts);
    free(v);
    return NULL;
}

/* Encodes whatever sealed block it finds, inside a section, and decodes the result. */
static void *flusher(void *arg)
{
    (void)arg;
    uint32_t rs;
    if (m3_reader_claim(seg, &rs) != M3_OK)
        fail("claim", READERS, 0);
    static uint8_t out[1 << 15];
    m3_flush_entry idx[16];
    int64_t t[2048];
    double v[2048];
    m3_block_info bi[64];
    while (!__atomic_load_n(&owner_done, __ATOMIC_ACQUIRE)) {
        size_t nb = 0;
        m3_read_begin(seg, rs);
        m3_shard_blocks(seg, 0, bi, 64, &nb);
        for (size_t b = 0; b < nb && b < 64; b++) {
            if (!bi[b].sealed)
                continue;
            uint32_t cursor = 0;
            size_t used, n;
            int rc;
            do {
                rc = m3_block_encode(seg, 0, bi[b].block_start, bi[b].kind, &cursor, out,
                                     sizeof out, &used, idx, 16, &n);
                if (rc < 0)
                    fail("flusher encode", rc, 0);
                for (size_t i = 0; i < n; i++) {
                    int64_t got = tsz_decode(out + idx[i].data_off, idx[i].data_len, t, v, 2048);
                    if (got != idx[i].count)
                        fail("flusher decode", (long)got, idx[i].count);
                    check_samples(id_of(out + idx[i].labels_off, idx[i].labels_len), t, v,
                                  (size_t)got);
                    checked[READERS] += (uint64_t)got;
                }
            } while (rc == 1);
        }
        m3_read_end(seg, rs);
        sched_yield();
    }
    m3_reader_release(seg, rs);
    return NULL;
}

int main(void)
{
    m3_seg_params p;
    memset(&p, 0, sizeof p);
    p.num_shards = 1;
    p.num_producers = 1;
    p.lane_bytes = 1 << 16;
    p.series_per_shard = 1024;
    p.arena_bytes = 2 << 20;
    p.block_ms = BLOCK_MS;
    uint64_t size = m3_seg_size(&p);
    seg = aligned_alloc(4096, (size + 4095) & ~(uint64_t)4095);
    if (!seg)
        fail("alloc", 0, 0);
    memset(seg, 0, size);
    if (m3_seg_init(seg, size, &p) != M3_OK)
        fail("init", 0, 0);
    pthread_t th[READERS + 2];
    for (uintptr_t i = 0; i < READERS; i++)
        pthread_create(&th[i], NULL, reader, (void *)i);
    pthread_create(&th[READERS], NULL, flusher, NULL);
    pthread_create(&th[READERS + 1], NULL, owner, NULL);
    for (int i = 0; i < READERS + 2; i++)
        pthread_join(th[i], NULL);
    m3_shard_reclaim(seg, 0);
    m3_shard_stats st;
    m3_shard_stats_get(seg, 0, &st);
    if (st.dropped != backpressure || !st.chunks_released || !st.series_removed || st.chunks_limbo ||
        st.nseries != WINDOW)
        fail("final stats", (long)st.dropped, (long)st.nseries);
    uint64_t total = 0;
    for (int i = 0; i <= READERS; i++)
        total += checked[i];
    printf("ok samples_checked=%llu chunks_released=%llu series_removed=%llu "
           "arena_bump=%llu full_retries=%llu\n", (unsigned long long)total,
           (unsigned long long)st.chunks_released, (unsigned long long)st.series_removed,
           (unsigned long long)st.arena_bump, (unsigned long long)backpressure);
    free(seg);
    return 0;
}
