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
 * Order of application: every batch carries a global sequence number, and the owner applies a
 * shard's records in exactly that order, which is the order commit-log replay applies them in,
 * so a restart reproduces what the live path did (two workers writing different values for one
 * series and timestamp: the larger seq wins, live and replayed). Taking the smallest seq among
 * the published records is not enough on its own: a batch with a smaller seq may still be
 * reserved and unpublished in another producer's lane (its commit-log write takes a while). So
 * each producer advertises pending[p] = 1 + the smallest seq it holds reserved and unpublished
 * (0: none), and the owner does not apply seq s while some pending[p] - 1 < s. The protocol
 * (m3_lane_reserve_next, m3_lane_publish, m3_lane_drain):
 *
 *   producer   (after the bytes are copied, room being certain)
 *              if pending == 0: pending := 1 (seq_cst store: "drawing a number now")
 *              s := fetch_add(global seq) (seq_cst)
 *              if it stored 1: pending := s + 1 (release); stamp s into the batch's records
 *              ... commit log ...  tails := wpos (release);  pending := 0 (release)
 *   owner      candidate r (seq s) seen through an acquire load of its lane's tail;
 *              for every producer p: v := pending[p] (acquire); v != 0 and v - 1 < s: stop;
 *              else reload p's tail (acquire) and take its head record if its seq is smaller.
 *
 * Why it is exact: let P draw x < s before Q drew s. P's fetch_add precedes Q's in the
 * counter's modification order, and seq_cst read-modify-writes synchronise, so P's store
 * "pending := 1" happens before Q's draw, Q's publish, and (through the owner's acquire of Q's
 * tail) the owner's load of pending[P]. That load therefore sees 1, x + 1, or a later store: 0
 * or a later group's value, both stored with release after P published x, so the reloaded tail
 * of P includes x. A producer never waits for lane room while it holds pending (a reservation
 * either fits now or nothing is drawn), so a pending seq is always one commit-log write from
 * being published; a killed producer's pending is cleared by its restarted incarnation
 * (m3_lane_recover_producer) and until then the owners wait, as they must: that batch may
 * still be in the commit log. Once the owner has verified seq s it knows every smaller seq is
 * applied or in its tails, so it checks again only for a larger seq (one check per batch).
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "seg_int.h"

int m3_rec_check(const m3_rec *r, size_t avail, uint32_t num_shards)
{
    if (avail < sizeof(m3_rec) || r->len < sizeof(m3_rec) || r->len % 8 || r->len > avail)
        return M3_ECORRUPT;
    if ((r->type != M3_REC_SAMPLES && r->type != M3_REC_ROLLUP_IN) ||
        r->vtype != M3_VT_FLOAT || r->shard >= num_shards)
        return M3_ECORRUPT;
    if (r->nsamples == 0 || r->nsamples > M3_REC_MAX_SAMPLES || r->labels_len == 0 ||
        r->labels_len > 65535 || rec_bytes_of(r->type, r->labels_len, r->nsamples) != r->len)
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

static inline uint64_t *pending_at(uint8_t *base, uint32_t producer)
{
    return (uint64_t *)(base + SEG_PENDING_OFF) + producer;
}

int m3_lane_reserve_next(uint8_t *base, uint32_t producer, const uint8_t *batch, size_t len,
                         uint64_t *seq)
{
    seg_hdr *h = seg_of(base);
    if (!seq || producer >= h->p.num_producers)
        return M3_EINVAL;
    int rc = m3_lane_reserve(base, producer, batch, len, 0);
    if (rc)
        return rc; /* nothing reserved, no number drawn, pending untouched */
    uint64_t *pend = pending_at(base, producer);
    /* Relaxed: only this producer writes its pending word. */
    int first = __atomic_load_n(pend, __ATOMIC_RELAXED) == 0;
    if (first)
        /* SeqCst: "a number is being drawn" happens before our fetch_add below, hence (the
           fetch_adds synchronise) before any larger number's publish and the owner's check. */
        __atomic_store_n(pend, 1, __ATOMIC_SEQ_CST);
    /* SeqCst read-modify-write: orders the store above before every later draw. */
    uint64_t s = __atomic_fetch_add((uint64_t *)(base + SEG_SEQ_OFF), 1, __ATOMIC_SEQ_CST);
    if (first)
        /* Release: an owner that reads this value (acquire) also sees everything this
           producer published before (its earlier groups). */
        __atomic_store_n(pend, s + 1, __ATOMIC_RELEASE);
    uint64_t cap = h->p.lane_bytes;
    for (uint32_t sh = 0; sh < h->p.num_shards; sh++) {
        lane_hdr *l = lane_at(base, sh, producer);
        /* Stamp the records just copied (unpublished, so only we can see them). */
        for (uint64_t pos = l->mark; pos < l->wpos;) {
            m3_rec *r = (m3_rec *)(lane_data(l) + (pos & (cap - 1)));
            if (r->type != M3_REC_PAD)
                r->seq = s;
            pos += r->len;
        }
    }
    *seq = s;
    return M3_OK;
}

void m3_lane_publish_bells(uint8_t *base, uint32_t producer, uint8_t *bells)
{
    seg_hdr *h = seg_of(base);
    if (producer >= h->p.num_producers || !bells)
        return;
    uint32_t np = h->p.num_producers, ns = h->p.num_shards;
    uint64_t owners[M3_MAX_PRODUCERS / 64] = {0};
    for (uint32_t s = 0; s < ns; s++) {
        lane_hdr *l = lane_at(base, s, producer);
        if (l->wpos != l->tail) {
            /* Release: the record bytes copied below wpos are visible before the tail that
               lets the owner read them. */
            __atomic_store_n(&l->tail, l->wpos, __ATOMIC_RELEASE);
            uint32_t o = shard_owner(s, ns, np);
            owners[o / 64] |= UINT64_C(1) << (o % 64);
        }
    }
    uint64_t *pend = pending_at(base, producer);
    if (__atomic_load_n(pend, __ATOMIC_RELAXED))
        /* Release: the tail stores above happen before an owner's acquire load that reads
           "nothing pending", so its reload of our tails sees them. */
        __atomic_store_n(pend, 0, __ATOMIC_RELEASE);
    /* SeqCst fence: the tail stores above are ordered before the bell loads below, as an
       owner's setting of its sleeping bit is before its backlog loads (bell.c): either we see
       the bit and wake it, or its backlog check sees our tails. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (uint32_t o = 0; o < np; o++)
        if (owners[o / 64] >> (o % 64) & 1)
            bell_ring_word(bell_at(bells, o), 0);
}

void m3_lane_publish(uint8_t *base, uint32_t producer)
{
    m3_lane_publish_bells(base, producer, base);
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
    /* Release: the unpublished reservation is gone; owners waiting on its seq go on (the
       batch never reached a 2xx, and replay orders whatever of it is in the commit log). */
    __atomic_store_n(pending_at(base, producer), 0, __ATOMIC_RELEASE);
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

/* Aggregation (store != NULL): the drain stopped before a record whose series has no plan.
   Walk every published record of the shard (up to tails) and list the series without a plan,
   each once per round, so Python resolves them all in one go (aggstore.c). Records are only
   read here, never consumed. */
static void scan_need(uint8_t *base, uint8_t *store, uint32_t shard, const uint64_t *tails,
                      uint32_t *need, uint32_t *need_gen, size_t cap, size_t *n)
{
    const seg_hdr *h = cseg_of(base);
    uint64_t lcap = h->p.lane_bytes;
    uint32_t round = m3_aggst_next_round(store, shard);
    for (uint32_t p = 0; p < h->p.num_producers && *n < cap; p++) {
        lane_hdr *l = lane_at(base, shard, p);
        for (uint64_t pos = l->head; pos < tails[p] && *n < cap;) {
            const m3_rec *r = (const m3_rec *)(lane_data(l) + (pos & (lcap - 1)));
            if (r->len < 8 || r->len % 8)
                break; /* cannot happen for published bytes; never loop on it */
            if ((r->type == M3_REC_SAMPLES || r->type == M3_REC_ROLLUP_IN) &&
                m3_aggst_want(base, store, r, round, &need[*n], &need_gen[*n]))
                (*n)++;
            pos += r->len;
        }
    }
}

static int drain_impl(uint8_t *base, uint8_t *store, uint32_t shard, uint32_t max_records,
                      int64_t now_ms, uint32_t *need, uint32_t *need_gen, size_t need_cap,
                      size_t *nneed)
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
    int verified = 0;
    uint64_t safe = 0; /* every seq <= safe is applied or in tails[] (see the design comment) */
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
        if (!verified || br->seq > safe) {
            int blocked = 0;
            for (uint32_t p = 0; p < np && !blocked; p++) {
                /* Acquire: pairs with the producer's release stores of pending (publish,
                   draw); reading 0 or a later group's value means its smaller seqs are
                   published, and the tail reload below sees them. */
                uint64_t v = __atomic_load_n(pending_at(base, p), __ATOMIC_ACQUIRE);
                if (v && v - 1 < br->seq) {
                    blocked = 1; /* p owes a smaller seq: wait for it */
                    break;
                }
                lane_hdr *l = lane_at(base, shard, p);
                /* Acquire: pairs with m3_lane_publish, as the first tail loads. */
                uint64_t t = __atomic_load_n(&l->tail, __ATOMIC_ACQUIRE);
                if (t != tails[p]) {
                    tails[p] = t;
                    const m3_rec *r = lane_peek(l, cap, t);
                    if (r && r->seq < br->seq) {
                        best = l;
                        br = r;
                    }
                }
            }
            if (blocked)
                break;
            verified = 1;
            safe = br->seq;
        }
        M3_ASSERT(m3_rec_check(br, br->len, h->p.num_shards) == 0 && br->shard == shard);
        if (!store) {
            m3_shard_apply_rec(base, br);
        } else if (m3_aggst_apply_rec(base, store, br, br->seq, best->head, now_ms) ==
                   M3_AGG_NEEDS_PLAN) {
            /* not consumed: it is applied once Python has installed the plan */
            scan_need(base, store, shard, tails, need, need_gen, need_cap, nneed);
            break;
        }
        /* Release: the record's bytes were fully read (and its samples applied and
           published in the series table) before the producer may reuse them; an owner
           killed before this store applies the record again, which is harmless. */
        __atomic_store_n(&best->head, best->head + br->len, __ATOMIC_RELEASE);
        applied++;
    }
    m3_shard_unlock(base, shard);
    return applied;
}

int m3_lane_drain(uint8_t *base, uint32_t shard, uint32_t max_records)
{
    return drain_impl(base, NULL, shard, max_records, 0, NULL, NULL, 0, NULL);
}

int m3_lane_drain_agg(uint8_t *base, uint8_t *store, uint32_t shard, uint32_t max_records,
                      int64_t now_ms, uint32_t *need, uint32_t *need_gen, size_t need_cap,
                      size_t *nneed)
{
    if (!store || !need || !need_gen || !nneed || need_cap == 0)
        return M3_EINVAL;
    *nneed = 0;
    return drain_impl(base, store, shard, max_records, now_ms, need, need_gen, need_cap,
                      nneed);
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
