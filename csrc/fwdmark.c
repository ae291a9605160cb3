/*
 * fwdmark.c -- the rollup barrier's source watermarks (docs/rules.md "Rollup forwarding",
 * "The barrier"; slot in docs/formats/stats.md).
 *
 * Format: one u64 per worker, `forwarded`, in that worker's block of the stats file (worker
 * slot W_FWD_MARK_MS): unix ms T such that every rollup input window of the worker's shards
 * final at T (window end + admission <= T) has been forwarded, i.e. its ROLLUP_IN records are
 * durable in the group namespace's commit log and published to the group owner's lanes. 0 =
 * not known yet (a group owner then holds every group window back).
 *
 * Writer: the worker itself (its finalise task), after a complete finalise round at T, and at
 * start with the boot's replay watermark. A mark only rises (a restarted worker keeps its
 * block, so its predecessor's mark stays valid: its cells survive in shared memory).
 *
 * Readers: every group owner (m3_fwd_mark_min). It then draws a sequence number of the group
 * namespace's segment (m3_seq_sync) and waits until its shards have applied everything
 * published below it before it lets its group cells finalise up to the minimum.
 *
 * Ordering: the release store of a mark is after the worker's lane publishes of the forwards
 * it covers (they happened on other threads of the same process, before the submit future
 * the finalise task awaited; the event loop's hand-over orders them before this store). A
 * reader's acquire load that sees the mark therefore sees those publishes happen before it,
 * and its m3_seq_sync that follows draws a number above every batch they hold.
 */
#include <stdint.h>
#include <stddef.h>

#include "m3shm.h"

void m3_fwd_mark_raise(uint64_t *marks, uint32_t stride, uint32_t self, int64_t t_ms)
{
    uint64_t *mine = marks + (size_t)self * stride;
    /* relaxed: only this worker writes its mark */
    uint64_t cur = __atomic_load_n(mine, __ATOMIC_RELAXED);
    if (t_ms > 0 && (uint64_t)t_ms > cur)
        /* release: the forwards' lane publishes before this mark (see the top comment) */
        __atomic_store_n(mine, (uint64_t)t_ms, __ATOMIC_RELEASE);
}

int64_t m3_fwd_mark_min(const uint64_t *marks, uint32_t nworkers, uint32_t stride)
{
    uint64_t lo = UINT64_MAX;
    for (uint32_t i = 0; i < nworkers; i++) {
        /* acquire: pairs with the release in m3_fwd_mark_raise; the publishes a mark covers
           happen before the caller's m3_seq_sync */
        uint64_t v = __atomic_load_n(marks + (size_t)i * stride, __ATOMIC_ACQUIRE);
        if (v < lo)
            lo = v;
    }
    return nworkers && lo <= (uint64_t)INT64_MAX ? (int64_t)lo : 0;
}
