/*
 * bell.c -- owner doorbells: an idle drain thread sleeps until a producer publishes to it.
 *
 * Without them an owner can only poll its lanes, and an idle daemon pays for every poll (each
 * pass walks every shard of every namespace's segment). A doorbell is one u32 per owner in a
 * segment's header (SEG_BELLS_OFF, docs/formats/shm.md "Doorbells"): bit 0 = the owner is
 * (about to be) asleep, bits 1..31 = a counter that every ring bumps. It is a futex word, in a
 * MAP_SHARED mapping, so the wait and the wake work across processes (FUTEX_WAIT without
 * FUTEX_PRIVATE_FLAG).
 *
 * One set of bells serves all of a worker's segments: the daemon's owners sleep on the raw
 * namespace's segment's bells, and every segment's producers ring those
 * (m3_lane_publish_bells; m3_lane_publish rings the segment's own).
 *
 * Protocol:
 *   owner     v := fetch_or(bell, 1) | 1 (seq_cst);  seq_cst fence;
 *             if any lane of its shards, in any of its segments, has tail != head: clear the
 *             bit, return "work" (the caller drains; it polls while a record waits for
 *             another producer's pending seq, lane.c);
 *             futex_wait(bell, v, timeout);  clear the bit
 *   producer  release-store the tails (m3_lane_publish);  seq_cst fence;
 *             for each owner whose lanes it published to: if bit 0 of its bell is set:
 *             fetch_add(bell, 2) and futex_wake it
 *
 * Why no wake is lost: the two seq_cst fences order "owner sets its bit, then loads the tails"
 * against "producer stores its tails, then loads the bit", so at least one side sees the
 * other's store (store-buffering is excluded by the fences). If the owner sees the tails it
 * does not sleep. If the producer sees the bit, its fetch_add changes the word away from v:
 * a futex_wait that starts after it returns at once (EAGAIN), one already waiting is woken.
 * A ring that comes while the owner is awake only bumps the counter; a wake-up without work
 * (a timeout, a stale ring) costs one drain pass. The timeout bounds every other delay: the
 * caller's stop flag and any work that is not a lane record (a rule-set install rings the
 * bell explicitly: m3_bell_ring).
 */
#include <stdint.h>
#include <stddef.h>
#include <time.h>

#include "seg_int.h"

/* Any record published and not consumed in shards [lo, hi) of the segment? */
static int has_backlog(const uint8_t *base, uint32_t lo, uint32_t hi)
{
    const seg_hdr *h = cseg_of(base);
    uint32_t np = h->p.num_producers;
    if (hi > h->p.num_shards)
        hi = h->p.num_shards;
    for (uint32_t s = lo; s < hi; s++)
        for (uint32_t p = 0; p < np; p++) {
            const lane_hdr *l = lane_at((uint8_t *)base, s, p);
            /* Acquire: pairs with m3_lane_publish's release of the tail (the caller drains
               what it announces); head is our own (the owner's) store. */
            if (__atomic_load_n(&l->tail, __ATOMIC_ACQUIRE) !=
                __atomic_load_n(&l->head, __ATOMIC_RELAXED))
                return 1;
        }
    return 0;
}

int m3_bell_wait(uint8_t *bells, uint32_t owner, uint8_t **segs, uint32_t nsegs, uint32_t lo,
                 uint32_t hi, uint32_t timeout_ms)
{
    if (!bells || owner >= cseg_of(bells)->p.num_producers || (nsegs && !segs))
        return M3_EINVAL;
    uint32_t *w = bell_at(bells, owner);
    /* SeqCst read-modify-write and fence: the sleeping bit is set before the tail loads below
       (pairs with the fence in m3_lane_publish_bells, which stores tails, then loads bits). */
    uint32_t v = __atomic_fetch_or(w, 1u, __ATOMIC_SEQ_CST) | 1u;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int work = 0;
    for (uint32_t i = 0; i < nsegs && !work; i++)
        work = has_backlog(segs[i], lo, hi);
    if (!work && timeout_ms) {
        struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L};
        /* returns at once if a ring changed the word since v was read (EAGAIN); woken,
           interrupted or timed out alike, the caller makes a pass */
        syscall(SYS_futex, w, FUTEX_WAIT, v, &ts, NULL, 0);
    }
    /* Relaxed: only this owner sets or clears bit 0; a producer that still sees it set only
       bumps the counter and wakes nobody (a harmless extra ring). */
    __atomic_fetch_and(w, ~1u, __ATOMIC_RELAXED);
    return work;
}

void m3_bell_ring(uint8_t *bells, uint32_t owner)
{
    if (!bells || owner >= cseg_of(bells)->p.num_producers)
        return;
    /* SeqCst: whatever the caller stored before (a stop flag, a pending rule set) is ordered
       before the bit load in bell_ring_word. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    bell_ring_word(bell_at(bells, owner), 1);
}

uint32_t m3_shard_owner(uint32_t shard, uint32_t num_shards, uint32_t num_producers)
{
    if (!num_shards || !num_producers || shard >= num_shards)
        return UINT32_MAX;
    return shard_owner(shard, num_shards, num_producers);
}
