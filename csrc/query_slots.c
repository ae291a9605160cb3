/*
 * query_slots.c -- daemon-wide admission of queries (config query.max_concurrency).
 *
 * Format: one u64 counter per worker, `running`, in that worker's block of the stats file
 * (docs/formats/stats.md, worker slot 28): how many queries the worker is evaluating now.
 * Counters are `stride` u64 apart starting at `counters`. Only the owning worker changes its
 * counter (enter/leave/reset); every worker reads all of them.
 *
 * Algorithm (claim, then verify): to admit a query a worker first adds 1 to its own counter,
 * then sums every counter. If the sum exceeds `limit` it takes its claim back and the caller
 * retries later; otherwise the query runs, and the worker subtracts 1 when it ends.
 *
 * Invariant: at most `limit` claims that were admitted are outstanding at once. Both the
 * claim (a seq_cst read-modify-write) and the loads of the sum are seq_cst, so of two workers
 * claiming concurrently at least one sees the other's claim in its sum (no store-load
 * reordering between them); both may see each other and both retry, never both miss each
 * other. A worker that dies holding claims leaves its counter high until its next
 * incarnation resets it (m3_qslot_reset) before it serves a query.
 */
#include <stdint.h>
#include <stddef.h>

#include "m3shm.h"

int m3_qslot_enter(uint64_t *counters, uint32_t nworkers, uint32_t stride, uint32_t self,
                   uint64_t limit)
{
    uint64_t *mine = counters + (size_t)self * stride;
    /* seq_cst RMW: our claim is ordered before the loads of every counter below */
    __atomic_fetch_add(mine, 1, __ATOMIC_SEQ_CST);
    uint64_t sum = 0;
    for (uint32_t i = 0; i < nworkers; i++)
        /* seq_cst load: ordered after our claim, and against other workers' claims */
        sum += __atomic_load_n(counters + (size_t)i * stride, __ATOMIC_SEQ_CST);
    if (sum <= limit)
        return 1;
    /* seq_cst: take the claim back (others may then admit) */
    __atomic_fetch_sub(mine, 1, __ATOMIC_SEQ_CST);
    return 0;
}

void m3_qslot_leave(uint64_t *counters, uint32_t stride, uint32_t self)
{
    /* seq_cst: the freed slot is visible to every later claim's sum */
    __atomic_fetch_sub(counters + (size_t)self * stride, 1, __ATOMIC_SEQ_CST);
}

void m3_qslot_reset(uint64_t *counters, uint32_t stride, uint32_t self)
{
    /* seq_cst: a dead incarnation's claims are released before this one claims */
    __atomic_store_n(counters + (size_t)self * stride, 0, __ATOMIC_SEQ_CST);
}
