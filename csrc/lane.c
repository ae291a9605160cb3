/*
 * lane.c -- each shard's lock-free MPSC ingest ring, built from one SPSC lane per producer.
 *
 * Shape: lane (shard s, producer p) carries records from worker p to the owner of shard s.
 * Every lane has exactly one writer (its producer) and one reader (the shard's owner), so the
 * multi-producer ring of the design is the set of lanes of a shard and needs no CAS: a
 * producer that is killed can only ever damage its own lane, and its restarted incarnation
 * cleans exactly that (m3_lane_recover_producer).
 *
 * Positions: head, tail and wpos are byte positions that only grow (u64, never wrap in
 * practice); the byte at position x lives at data[x & (lane_bytes - 1)]. lane_bytes is a power
 * of two. Records are 8-byte aligned and never straddle the end of the buffer: a producer that
 * would cross it writes a PAD record covering the rest of the buffer and starts at the next lap.
 *
 *   [head, tail)   published, not yet applied: the owner may read it
 *   [tail, wpos)   reserved by the producer (copied, not yet published): invisible
 *   free           lane_bytes - (wpos - head)
 *
 * Protocol (the fences; each site repeats what it orders):
 *   producer   copy record bytes at wpos ... (m3_lane_reserve)
 *              tail := wpos with a release store            (m3_lane_publish)
 *   owner      t := tail with an acquire load  -> bytes in [head, t) are complete
 *              apply the records, then head := end with a release store, so the producer's
 *              acquire load of head sees the owner's reads of those bytes as finished before
 *              it overwrites them.
 *
 * A record becomes visible only when the tail moves past it, so a half-written record (the
 * producer was killed mid-copy) is never seen: it lies beyond the tail, and the restarted
 * producer resets wpos to tail before writing again. A slow producer is just a lane whose tail
 * has not moved; nothing ever waits on it or guesses that it is dead. Batches are all or
 * nothing per producer: m3_lane_reserve rolls every lane back to its mark if any lane is full,
 * and the worker calls m3_lane_publish only after the batch is in its commit log.
 *
 * Draining: the owner of a shard applies, among the records available in all of its lanes,
 * the one with the smallest global sequence number first, so that when batches from several
 * workers are all waiting, the live path applies them in the order commit-log replay will.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "seg_int.h"

int m3_rec_check(const m3_rec *r, size_t avail, uint32_t num_shards)
{
    if (avail < sizeof(m3_rec) || r->len < sizeof(m3_rec) || r->len % 8 || r->len > avail)
        return M3_ECORRUPT;
    if (r->type != M3_REC_SAMPLES || r->vtype != M3_VT_FLOAT || r->shard >= num_shards)
        return M3_ECORRUPT;
    if (r->nsamples == 0 || r->nsamples > M3_REC_MAX_SAMPLES || r->labels_len == 0 ||
        r->labels_len > 65535 || rec_bytes(r->labels_len, r->nsamples) != r->len)
        return M3_ECORRUPT;
    return M3_OK;
}

/* Room for n contiguous bytes at the producer's wpos (adding a PAD record if needed);
   returns the position to write at, or UINT64_MAX if the lane is too full. */
static uint64_t lane_claim(lane_hdr *l, uint64_t cap, uint64_t n)
{
    /* Acquire: pairs with the owner's release of head; its reads of the bytes before head
       are done, so they may be overwritten. */
    uint64_t head = __atomic_load_n(&l->head, __ATOMIC_ACQUIRE);
    uint64_t pos = l->wpos;
    uint64_t off = pos & (cap - 1);
    uint64_t pad = (cap - off < n) ? cap - off : 0;
    if (pos + pad + n - head > cap)
        return UINT64_MAX;
    if (pad) {
        m3_rec *r = (m3_rec *)(lane_data(l) + off);
        r->len = (uint32_t)pad;
        r->type = M3_REC_PAD;
        pos += pad;
    }
    return pos;
}

int m3_lane_reserve(uint8_t *base, uint32_t producer, const uint8_t *batch, size_t len,
                    uint64_t seq)
{
    seg_hdr *h = seg_of(base);
    if (!batch || producer >= h->p.num_producers)
        return M3_EINVAL;
    uint64_t cap = h->p.lane_bytes;
    for (uint32_t s = 0; s < h->p.num_shards; s++) {
        lane_hdr *l = lane_at(base, s, producer);
        l->mark = l->wpos;
    }
    size_t off = 0;
    int rc = M3_OK;
    while (off < len) {
        const m3_rec *r = (const m3_rec *)(batch + off);
        rc = m3_rec_check(r, len - off, h->p.num_shards);
        if (rc)
            break;
        if (r->len > cap / 2) {
            rc = M3_EINVAL;
            break;
        }
        lane_hdr *l = lane_at(base, r->shard, producer);
        uint64_t pos = lane_claim(l, cap, r->len);
        if (pos == UINT64_MAX) {
            rc = M3_ENOSPC;
            break;
        }
        uint8_t *dst = lane_data(l) + (pos & (cap - 1));
        memcpy(dst, r, r->len);
        ((m3_rec *)dst)->seq = seq;
        l->wpos = pos + r->len;
        off += r->len;
    }
    if (rc) {
        for (uint32_t s = 0; s < h->p.num_shards; s++) {
            lane_hdr *l = lane_at(base, s, producer);
            l->wpos = l->mark;
        }
    }
    return rc;
}

void m3_lane_publish(uint8_t *base, uint32_t producer)
{
    seg_hdr *h = seg_of(base);
    if (producer >= h->p.num_producers)
        return;
    for (uint32_t s = 0; s < h->p.num_shards; s++) {
        lane_hdr *l = lane_at(base, s, producer);
        if (l->wpos != l->tail)
            /* Release: the record bytes copied below wpos are visible before the tail that
               lets the owner read them. */
            __atomic_store_n(&l->tail, l->wpos, __ATOMIC_RELEASE);
    }
}

void m3_lane_recover_producer(uint8_t *base, uint32_t producer)
{
    seg_hdr *h = seg_of(base);
    if (producer >= h->p.num_producers)
        return;
    for (uint32_t s = 0; s < h->p.num_shards; s++) {
        lane_hdr *l = lane_at(base, s, producer);
        /* Only this (new) producer writes tail, so a relaxed load is exact. Bytes in
           [tail, wpos) were never published; drop them. */
        l->wpos = l->mark = __atomic_load_n(&l->tail, __ATOMIC_RELAXED);
    }
}

/* Skip PAD records at the owner's head; returns the record at head or NULL if none before
   tail. Advances (and releases) head past pads. */
static const m3_rec *lane_peek(lane_hdr *l, uint64_t cap, uint64_t tail)
{
    uint64_t head = l->head;
    while (head < tail) {
        const m3_rec *r = (const m3_rec *)(lane_data(l) + (head & (cap - 1)));
        if (r->type != M3_REC_PAD)
            return r;
        M3_ASSERT(r->len >= 8 && r->len <= cap - (head & (cap - 1)));
        head += r->len;
        /* Release: our reads of the pad are done before the producer may reuse its bytes. */
        __atomic_store_n(&l->head, head, __ATOMIC_RELEASE);
    }
    return NULL;
}

int m3_lane_drain(uint8_t *base, uint32_t shard, uint32_t max_records)
{
    seg_hdr *h = seg_of(base);
    if (shard >= h->p.num_shards)
        return M3_EINVAL;
    uint32_t np = h->p.num_producers;
    uint64_t cap = h->p.lane_bytes;
    uint64_t tails[M3_MAX_PRODUCERS];
    for (uint32_t p = 0; p < np; p++)
        /* Acquire: pairs with m3_lane_publish; every record before this tail is complete. */
        tails[p] = __atomic_load_n(&lane_at(base, shard, p)->tail, __ATOMIC_ACQUIRE);
    int applied = 0;
    m3_shard_lock(base, shard);
    while ((uint32_t)applied < max_records) {
        lane_hdr *best = NULL;
        const m3_rec *br = NULL;
        for (uint32_t p = 0; p < np; p++) {
            lane_hdr *l = lane_at(base, shard, p);
            const m3_rec *r = lane_peek(l, cap, tails[p]);
            if (r && (!br || r->seq < br->seq)) {
                best = l;
                br = r;
            }
        }
        if (!best)
            break;
        M3_ASSERT(m3_rec_check(br, br->len, h->p.num_shards) == 0 && br->shard == shard);
        m3_shard_apply_rec(base, br);
        /* Release: the record's bytes were fully read (and its samples applied and
           published in the series table) before the producer may reuse them; an owner
           killed before this store applies the record again, which is harmless. */
        __atomic_store_n(&best->head, best->head + br->len, __ATOMIC_RELEASE);
        applied++;
    }
    m3_shard_unlock(base, shard);
    return applied;
}

int m3_lane_pop_spsc(uint8_t *base, uint32_t shard, uint32_t producer, uint8_t *out,
                     size_t cap_out, size_t *len)
{
    seg_hdr *h = seg_of(base);
    if (shard >= h->p.num_shards || producer >= h->p.num_producers || !len)
        return M3_EINVAL;
    *len = 0;
    lane_hdr *l = lane_at(base, shard, producer);
    /* Acquire: pairs with m3_lane_publish. */
    uint64_t tail = __atomic_load_n(&l->tail, __ATOMIC_ACQUIRE);
    const m3_rec *r = lane_peek(l, h->p.lane_bytes, tail);
    if (!r)
        return M3_OK;
    if (r->len > cap_out)
        return M3_ENOSPC;
    memcpy(out, r, r->len);
    *len = r->len;
    /* Release: the copy above is done before the producer may overwrite the bytes. */
    __atomic_store_n(&l->head, l->head + r->len, __ATOMIC_RELEASE);
    return M3_OK;
}

void m3_lane_tails(const uint8_t *base, uint64_t *tails)
{
    const seg_hdr *h = cseg_of(base);
    uint64_t n = (uint64_t)h->p.num_shards * h->p.num_producers;
    for (uint64_t i = 0; i < n; i++) {
        const lane_hdr *l = (const lane_hdr *)(base + h->lanes_off + i * h->lane_stride);
        /* Acquire: a reader that waits for these tails to be applied sees every batch
           whose publish happened before this load. */
        tails[i] = __atomic_load_n(&l->tail, __ATOMIC_ACQUIRE);
    }
}

int m3_lane_caught_up(const uint8_t *base, const uint64_t *tails)
{
    const seg_hdr *h = cseg_of(base);
    uint64_t n = (uint64_t)h->p.num_shards * h->p.num_producers;
    for (uint64_t i = 0; i < n; i++) {
        const lane_hdr *l = (const lane_hdr *)(base + h->lanes_off + i * h->lane_stride);
        /* Acquire: pairs with the owner's release of head after applying; the samples of
           every record before head are published in the series table. */
        if (__atomic_load_n(&l->head, __ATOMIC_ACQUIRE) < tails[i])
            return 0;
    }
    return 1;
}

uint64_t m3_lane_backlog(const uint8_t *base, uint32_t shard)
{
    const seg_hdr *h = cseg_of(base);
    if (shard >= h->p.num_shards)
        return 0;
    uint64_t sum = 0;
    for (uint32_t p = 0; p < h->p.num_producers; p++) {
        const lane_hdr *l = lane_at((uint8_t *)base, shard, p);
        sum += __atomic_load_n(&l->tail, __ATOMIC_ACQUIRE) -
               __atomic_load_n(&l->head, __ATOMIC_ACQUIRE);
    }
    return sum;
}
