/*
 * flush.c -- what commit-log trimming after a flush needs, in C so no Python touches a
 * sample (the blocks themselves are sealed, encoded and released by block.c):
 *
 *   m3_batch_time_range  min and max sample timestamp of a commit-log batch (the commit log
 *                        records per file which blocks its samples touch).
 *   m3_seq_sync          take a global sequence number between two fences (below).
 *
 * m3_seq_sync and the commit log: a flush pass must know that every batch of a closed commit-
 * log segment was applied to the shards before the pass looked at them. The commit-log writer
 * closes a segment after publishing its last batch and then calls m3_seq_sync (release fence,
 * then a fetch-add of the segment's global sequence counter); a flush pass calls m3_seq_sync
 * (fetch-add, then acquire fence) before it snapshots the lane tails. If the pass's number is
 * greater than the writer's, its fetch-add read a value in the release sequence of the
 * writer's (read-modify-writes continue release sequences), so the writer's release fence
 * synchronises with the pass's acquire fence: the writer's publishes (release stores of lane
 * tails) happen before the pass's tail loads, and the pass waits for those tails.
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "seg_int.h"

int m3_batch_time_range(const uint8_t *batch, size_t len, int64_t *mint, int64_t *maxt)
{
    if (!batch || !mint || !maxt)
        return M3_EINVAL;
    int64_t lo = INT64_MAX, hi = INT64_MIN;
    size_t off = 0;
    while (off < len) {
        if (off % 8 || len - off < sizeof(m3_rec))
            return M3_ECORRUPT;
        const m3_rec *r = (const m3_rec *)(batch + off);
        if (r->len < sizeof(m3_rec) || r->len % 8 || r->len > len - off)
            return M3_ECORRUPT;
        if (r->type == M3_REC_SAMPLES || r->type == M3_REC_ROLLUP_IN) {
            /* a ROLLUP_IN record's ts are window ends: its file is kept until their blocks
               are flushed, long after the group windows are final */
            if (rec_bytes_of(r->type, r->labels_len, r->nsamples) != r->len)
                return M3_ECORRUPT;
            const int64_t *ts =
                (const int64_t *)((const uint8_t *)(r + 1) + round8(r->labels_len));
            for (uint32_t i = 0; i < r->nsamples; i++) {
                if (ts[i] < lo)
                    lo = ts[i];
                if (ts[i] > hi)
                    hi = ts[i];
            }
        }
        off += r->len;
    }
    *mint = lo;
    *maxt = hi;
    return M3_OK;
}

uint64_t m3_seq_sync(uint8_t *base)
{
    /* Release: every lane publish this thread made happens before a later m3_seq_sync that
       draws a greater number (see the design comment). */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    uint64_t v = m3_seg_next_seq(base);
    /* Acquire: pairs with the release fence of every m3_seq_sync that drew a smaller number;
       their publishes are visible to the lane-tail loads that follow. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return v;
}
