/*
 * rollup.c -- rollup forwarding: the M3_REC_ROLLUP_IN record (build, check) and its exactly-once
 * application to a rollup group cell by the group series' owner.
 *
 * A rollup rule (docs/rules.md) runs in two stages. The series stage runs in every input
 * series' cells at the input's owner; each finalised window value is forwarded to the owner of
 * the rolled-up (group) series, in the aggregated namespace of the policy, as a record of type
 * M3_REC_ROLLUP_IN (3). Format (docs/formats/shm.md, "ROLLUP_IN record"):
 *
 *   m3_rec header (48) | group labels (padded to 8) | ts <i64 x n> | v <f64 x n> | tail (32)
 *   tail: fwd <u64> ordinal <u32> rule <u32> source <u32> pad <u32> res_ms <i64>
 *
 * The header's hash, shard and labels are the group series' (so the record is routed to the
 * group owner's shard like any sample); ts[i] is an input window's end (a multiple of res_ms),
 * v[i] its finalised value. `rule` identifies the rollup rule (m3shm.rules.rollup_plan.rule_id),
 * `res_ms` the policy's resolution (the namespace holding the record names the policy; the
 * group owner checks that the group cell's resolution agrees). `fwd` names one forward: one
 * finalise pass of worker `source` into this namespace, a number from the raw segment's global
 * sequence counter (strictly increasing per source, across boots); `ordinal` numbers the
 * forward's records from 0 in the order they were built.
 *
 * Exactly once. A source that dies between submitting a forward and dropping the forwarded
 * windows from its cells submits the same forward again (same fwd, same records) when it
 * restarts; part of the first attempt may be applied already (a batch larger than half a lane
 * is committed in parts). The group owner therefore keeps, per shard, a forward table with one
 * entry per source: the last (fwd, ordinal) applied. A forward's records of one shard arrive in
 * ordinal order (parts are committed in order, and the owner applies in global seq order), so
 * a record at or below the entry is a duplicate.
 *
 * All or nothing. An owner killed halfway through a record would leave the cell with a prefix
 * of its samples applied; the lane gives the record again after the restart and the prefix
 * would count twice (the cell's own last_seq only says whether a whole apply finished). So a
 * record never touches the group cell directly: the cell is copied into the table's scratch
 * cell (state 1), the record applied to the copy, the scratch marked complete with the
 * record's identity (state 2), copied back over the cell, the source's entry advanced, and the
 * state cleared. A re-drained record finds either its entry advanced (skip), a complete
 * scratch of its own (copy it back again: idempotent), or anything else (start over: the cell
 * was not touched). Cost: two copies of the cell per record (one record per group per forward).
 * Rows of windows the apply finalises early are lost if the owner dies before the caller has
 * passed them on (they are only emitted when a forward arrives far beyond the ring).
 *
 * The table is owner-private memory in shared memory (no other process reads it): only the
 * compiler may reorder its stores, and the signal fences below forbid that where it matters (a
 * SIGKILLed process's completed stores stay in the mapping).
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "seg_int.h"
#include "m3_int.h"

#define FWD_MAGIC 0x54445746u /* "FWDT" little-endian */
#define TS_LIMIT (INT64_C(1) << 62)
#define RES_LIMIT (INT64_C(1) << 40)

_Static_assert(sizeof(m3_rollup_tail) == M3_ROLLUP_TAIL_BYTES, "tail layout");
_Static_assert(sizeof(m3_fwd_entry) == 16, "forward table entry layout");
_Static_assert(sizeof(m3_fwd_table) == 64, "forward table header layout");

uint64_t m3_rollup_rec_bytes(uint32_t labels_len, uint32_t nsamples)
{
    return rec_bytes(labels_len, nsamples) + M3_ROLLUP_TAIL_BYTES;
}

const m3_rollup_tail *m3_rollup_tail_of(const m3_rec *r)
{
    return (const m3_rollup_tail *)((const uint8_t *)r + r->len - M3_ROLLUP_TAIL_BYTES);
}

int m3_rollup_check(const m3_rec *r, size_t avail, uint32_t num_shards, uint32_t num_sources)
{
    int rc = m3_rec_check(r, avail, num_shards);
    if (rc)
        return rc;
    if (r->type != M3_REC_ROLLUP_IN || r->tenant != 0)
        return M3_ECORRUPT;
    const m3_rollup_tail *t = m3_rollup_tail_of(r);
    if (t->pad != 0 || t->fwd == 0 || t->rule == 0 || t->source >= num_sources || t->res_ms <= 0 ||
        t->res_ms > RES_LIMIT)
        return M3_ECORRUPT;
    const int64_t *ts = (const int64_t *)((const uint8_t *)(r + 1) + round8(r->labels_len));
    for (uint32_t i = 0; i < r->nsamples; i++)
        if (ts[i] <= -TS_LIMIT || ts[i] >= TS_LIMIT || ts[i] % t->res_ms)
            return M3_ECORRUPT;
    return M3_OK;
}

int m3_rollup_build(const uint8_t *labels, const uint64_t *labels_off, uint32_t ngroups,
                    const uint32_t *group_rule, const uint32_t *row_group, const int64_t *ts,
                    const double *v, size_t nrows, uint32_t num_shards, uint64_t fwd,
                    uint32_t source, int64_t res_ms, uint8_t *out, size_t cap, size_t *len,
                    uint32_t *nrecords)
{
    if (!len || !nrecords || !labels_off || (nrows && (!row_group || !ts || !v)) ||
        (ngroups && !group_rule) || !num_shards || res_ms <= 0 || fwd == 0)
        return M3_EINVAL;
    /* first pass: validate and size */
    uint64_t need = 0;
    for (size_t i = 0; i < nrows;) {
        uint32_t g = row_group[i];
        if (g >= ngroups || labels_off[g + 1] < labels_off[g] || group_rule[g] == 0)
            return M3_EINVAL;
        uint64_t ll = labels_off[g + 1] - labels_off[g];
        if (ll == 0 || ll > 65535)
            return M3_EINVAL;
        size_t j = i;
        while (j < nrows && row_group[j] == g && j - i < M3_REC_MAX_SAMPLES) {
            if (ts[j] % res_ms)
                return M3_EINVAL;
            j++;
        }
        need += m3_rollup_rec_bytes((uint32_t)ll, (uint32_t)(j - i));
        i = j;
    }
    *len = need;
    *nrecords = 0;
    if (need > cap || (need && !out))
        return M3_ENOSPC;
    size_t off = 0;
    uint32_t ord = 0;
    for (size_t i = 0; i < nrows;) {
        uint32_t g = row_group[i];
        const uint8_t *lab = labels + labels_off[g];
        uint32_t ll = (uint32_t)(labels_off[g + 1] - labels_off[g]);
        size_t j = i;
        while (j < nrows && row_group[j] == g && j - i < M3_REC_MAX_SAMPLES)
            j++;
        uint32_t n = (uint32_t)(j - i);
        m3_rec *r = (m3_rec *)(out + off);
        memset(r, 0, sizeof *r);
        r->len = (uint32_t)m3_rollup_rec_bytes(ll, n);
        r->type = M3_REC_ROLLUP_IN;
        r->vtype = M3_VT_FLOAT;
        r->hash = m3_labels_hash(lab, ll);
        r->shard = (uint32_t)(r->hash % num_shards);
        r->nsamples = n;
        r->labels_len = ll;
        uint32_t nl = 0;
        for (uint32_t p = 0; p + 2 <= ll && nl < 65536; nl++) {
            /* count name/value pairs: u16 len, bytes, u16 len, bytes */
            uint16_t a, b;
            memcpy(&a, lab + p, 2);
            p += 2 + a;
            if (p + 2 > ll)
                break;
            memcpy(&b, lab + p, 2);
            p += 2 + b;
        }
        r->nlabels = nl;
        uint8_t *body = (uint8_t *)(r + 1);
        memcpy(body, lab, ll);
        memset(body + ll, 0, round8(ll) - ll);
        memcpy(body + round8(ll), ts + i, (size_t)n * 8);
        memcpy(body + round8(ll) + (size_t)n * 8, v + i, (size_t)n * 8);
        m3_rollup_tail *t = (m3_rollup_tail *)((uint8_t *)r + r->len - M3_ROLLUP_TAIL_BYTES);
        t->fwd = fwd;
        t->ordinal = ord++;
        t->rule = group_rule[g];
        t->source = source;
        t->pad = 0;
        t->res_ms = res_ms;
        off += r->len;
        i = j;
    }
    *nrecords = ord;
    return M3_OK;
}

uint64_t m3_fwd_table_bytes(uint32_t num_sources, uint64_t scratch_cap)
{
    return sizeof(m3_fwd_table) + (uint64_t)num_sources * sizeof(m3_fwd_entry) +
           ((scratch_cap + 7) & ~(uint64_t)7);
}

int m3_fwd_table_init(uint8_t *mem, uint64_t cap, uint32_t num_sources, uint64_t scratch_cap)
{
    if (!mem || num_sources == 0 || num_sources > M3_MAX_PRODUCERS || scratch_cap % 8 ||
        scratch_cap < sizeof(m3_aggcell) || cap < m3_fwd_table_bytes(num_sources, scratch_cap))
        return M3_EINVAL;
    memset(mem, 0, sizeof(m3_fwd_table) + (uint64_t)num_sources * sizeof(m3_fwd_entry));
    m3_fwd_table *t = (m3_fwd_table *)mem;
    t->version = M3_FWD_VERSION;
    t->num_sources = num_sources;
    t->scratch_cap = scratch_cap;
    /* Compiler-only ordering: the magic last, so a table is usable once it is complete. */
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    t->magic = FWD_MAGIC;
    return M3_OK;
}

int m3_fwd_table_check(const uint8_t *mem, uint64_t cap)
{
    if (!mem || cap < sizeof(m3_fwd_table))
        return M3_EINVAL;
    const m3_fwd_table *t = (const m3_fwd_table *)mem;
    if (t->magic != FWD_MAGIC)
        return M3_ECORRUPT;
    if (t->version != M3_FWD_VERSION)
        return M3_EVERSION;
    if (t->num_sources == 0 || t->num_sources > M3_MAX_PRODUCERS || t->state > 2 ||
        t->scratch_cap % 8 || cap < m3_fwd_table_bytes(t->num_sources, t->scratch_cap))
        return M3_ECORRUPT;
    return M3_OK;
}

static int before_or_at(uint64_t f1, uint32_t o1, uint64_t f2, uint32_t o2)
{
    return f1 < f2 || (f1 == f2 && o1 <= o2);
}

enum { ST_IDLE = 0, ST_FILLING = 1, ST_READY = 2 };

int m3_rollup_apply(uint8_t *table, const m3_rec *r, uint8_t *cells, uint64_t stride,
                    uint32_t ncells, uint32_t cell, int64_t now_ms, m3_agg_out *out,
                    size_t cap, size_t *nout)
{
    if (!table || !r || !cells || !nout || cell >= ncells || stride % 8 ||
        stride < sizeof(m3_aggcell))
        return M3_EINVAL;
    m3_fwd_table *t = (m3_fwd_table *)table;
    if (t->magic != FWD_MAGIC || t->version != M3_FWD_VERSION)
        return M3_ECORRUPT;
    if (r->type != M3_REC_ROLLUP_IN || stride > t->scratch_cap)
        return M3_EINVAL;
    const m3_rollup_tail *tl = m3_rollup_tail_of(r);
    if (tl->source >= t->num_sources)
        return M3_ECORRUPT;
    uint8_t *target = cells + (uint64_t)cell * stride;
    const m3_aggcell *c = (const m3_aggcell *)target;
    if (c->p.res_ms != tl->res_ms)
        return M3_EINVAL; /* forwarded to a cell of another policy */
    /* out must hold every row the apply can evict (each window opened before or by this
       record, once, times the aggregations) */
    if (cap < ((size_t)M3_AGG_MAX_WINDOWS + r->nsamples) * (size_t)__builtin_popcount(c->p.aggmask))
        return M3_EINVAL;
    m3_fwd_entry *e = &((m3_fwd_entry *)(t + 1))[tl->source];
    uint8_t *scratch = (uint8_t *)((m3_fwd_entry *)(t + 1) + t->num_sources);
    *nout = 0;
    if (e->fwd && before_or_at(tl->fwd, tl->ordinal, e->fwd, e->ordinal)) {
        t->dup_records++;
        return 0; /* applied before (a source retrying a forward, or a re-drain) */
    }
    int redo = t->state == ST_READY && t->scratch_source == tl->source &&
               t->scratch_fwd == tl->fwd && t->scratch_ordinal == tl->ordinal &&
               t->scratch_cell == cell;
    if (!redo) {
        t->state = ST_FILLING;
        /* Compiler-only ordering (here and below): each state is in memory before the step it
           guards begins, and each step's stores before the state that says it is done. */
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        memcpy(scratch, target, stride);
        const int64_t *ts = (const int64_t *)((const uint8_t *)(r + 1) + round8(r->labels_len));
        const double *v = (const double *)(ts + r->nsamples);
        size_t done = 0;
        int rc = m3_agg_apply(scratch, stride, 1, 0, 0, ts, v, r->nsamples, now_ms, out, cap,
                              nout, &done);
        if (rc) {
            t->state = ST_IDLE;
            *nout = 0;
            return rc; /* the cell is untouched */
        }
        for (size_t i = 0; i < *nout; i++)
            out[i].cell = cell;
        t->scratch_source = tl->source;
        t->scratch_fwd = tl->fwd;
        t->scratch_ordinal = tl->ordinal;
        t->scratch_cell = cell;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        t->state = ST_READY;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
    }
    memcpy(target, scratch, stride);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    e->fwd = tl->fwd;
    e->ordinal = tl->ordinal;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    t->state = ST_IDLE;
    t->applied_records++;
    return 1;
}
