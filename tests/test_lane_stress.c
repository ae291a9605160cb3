/*
 * Pure-C stress test of the lane protocol (csrc/lane.c), built and run by tests/test_c_stress.py
 * with ThreadSanitizer (and, in a second build, ASan+UBSan): P producer threads, each the only
 * producer of its lanes, push batches of records spread over S shards through
 * m3_lane_reserve/m3_lane_publish on small lanes (so they wrap and fill); one consumer thread
 * pops every lane with m3_lane_pop_spsc and checks that each (producer, shard) stream arrives
 * exactly once and in order. TSan checks that every byte the consumer reads was published by a
 * release store it acquired (no data race on lane memory). Exit status 0 = pass.
 */
#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>

#include "seg_int.h" /* includes m3shm.h */

#define P 4
#define S 8
#define BATCHES 3000

static uint8_t *seg;
static volatile int producers_left = P;

static size_t build(uint8_t *out, uint32_t producer, uint32_t shard, uint64_t counter)
{
    uint8_t labels[16];
    uint32_t ll = 0;
    labels[ll++] = 1, labels[ll++] = 0, labels[ll++] = 'p';
    labels[ll++] = 1, labels[ll++] = 0, labels[ll++] = (uint8_t)('0' + producer);
    m3_rec *r = (m3_rec *)out;
    memset(r, 0, sizeof *r);
    r->len = (uint32_t)rec_bytes(ll, 1);
    r->type = M3_REC_SAMPLES;
    r->vtype = M3_VT_FLOAT;
    r->shard = shard;
    r->hash = m3_labels_hash(labels, ll);
    r->nsamples = 1;
    r->labels_len = ll;
    r->nlabels = 1;
    uint8_t *q = (uint8_t *)(r + 1);
    memset(q, 0, round8(ll));
    memcpy(q, labels, ll);
    q += round8(ll);
    int64_t ts = (int64_t)counter;
    double v = (double)producer;
    memcpy(q, &ts, 8);
    memcpy(q + 8, &v, 8);
    return r->len;
}

static void *producer(void *arg)
{
    uint32_t p = (uint32_t)(uintptr_t)arg;
    uint64_t counter[S] = {0};
    uint8_t batch[16 * 128];
    unsigned rng = p * 7919 + 1;
    for (int b = 0; b < BATCHES; b++) {
        size_t len = 0;
        int n = 1 + (int)(rng % 12);
        uint64_t saved[S];
        memcpy(saved, counter, sizeof saved);
        for (int k = 0; k < n; k++) {
            rng = rng * 1103515245u + 12345u;
            uint32_t s = (rng >> 16) % S;
            len += build(batch + len, p, s, counter[s]++);
        }
        while (m3_lane_reserve(seg, p, batch, len, (uint64_t)b) == M3_ENOSPC)
            sched_yield();
        m3_lane_publish(seg, p);
    }
    __atomic_fetch_sub(&producers_left, 1, __ATOMIC_RELEASE);
    return NULL;
}

int main(void)
{
    m3_seg_params prm;
    memset(&prm, 0, sizeof prm);
    prm.num_shards = S;
    prm.num_producers = P;
    prm.lane_bytes = 64 << 10;
    prm.series_per_shard = 64;
    prm.arena_bytes = 64 << 10;
    prm.block_ms = 1000;
    uint64_t size = m3_seg_size(&prm);
    seg = calloc(1, size);
    if (!seg || m3_seg_init(seg, size, &prm))
        return 2;
    pthread_t th[P];
    for (uintptr_t p = 0; p < P; p++)
        pthread_create(&th[p], NULL, producer, (void *)p);
    uint64_t next[P][S];
    memset(next, 0, sizeof next);
    uint64_t total = 0;
    uint8_t out[256];
    for (;;) {
        int left = __atomic_load_n(&producers_left, __ATOMIC_ACQUIRE);
        uint64_t got = 0;
        for (uint32_t s = 0; s < S; s++)
            for (uint32_t p = 0; p < P; p++) {
                size_t len;
                while (m3_lane_pop_spsc(seg, s, p, out, sizeof out, &len) == M3_OK && len) {
                    const m3_rec *r = (const m3_rec *)out;
                    int64_t ts;
                    memcpy(&ts, out + sizeof(m3_rec) + round8(r->labels_len), 8);
                    if (r->shard != s || (uint64_t)ts != next[p][s]) {
                        fprintf(stderr, "lane (%u,%u): got %lld, want %llu\n", s, p,
                                (long long)ts, (unsigned long long)next[p][s]);
                        return 1;
                    }
                    next[p][s]++;
                    got++;
                }
            }
        total += got;
        if (!left && !got)
            break;
        if (!got)
            sched_yield();
    }
    for (uintptr_t p = 0; p < P; p++)
        pthread_join(th[p], NULL);
    printf("ok %llu records\n", (unsigned long long)total);
    free(seg);
    return 0;
}
