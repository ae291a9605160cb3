/*
 * aggstore.c -- the aggregation store: downsampling cells in shared memory, per shard, and the
 * plans that tie a series to its cells (format: docs/formats/aggstore.md).
 *
 * One store per segment, a file next to it in /dev/shm, created with the segment by the
 * supervisor and inherited by the workers, so a worker killed by SIGKILL finds its cells again
 * (a full restart creates both afresh and rebuilds open windows from the commit log). The
 * store has one region per shard of its segment; the shard's owner is its only writer, and
 * every write (drain thread: apply, install; timer: prepare, commit) holds the segment's shard
 * lock (m3_shard_lock), so the owner's threads never race. Other processes read only the
 * shard counters (relaxed loads of relaxed stores: statistics, no ordering implied).
 *
 * Region: header | plan table (one entry per series slot of the segment's shard) | spill |
 * arena. A plan entry names the series generation it was made for, flags (RESOLVED, DROP_RAW)
 * and a plan block in the arena: a block header, one descriptor per cell (what the cell's rows
 * become: namespace id, kind, labels), label sets for cells that emit under fixed labels (a
 * rollup group), then the cells (csrc/aggwin.c layout), 8-byte aligned. A slot whose series
 * is replaced (generation changes) or whose plan is replaced (new rules) moves its old block
 * to the retiring list, which is finalised like the table and freed once its cells hold no
 * open window; freed blocks are reused first fit.
 *
 * Drain (m3_aggst_apply_rec, from m3_lane_drain_agg / m3_shard_apply_batch_agg): the record's
 * series is looked up (created if new). No plan for this generation: return
 * M3_AGG_NEEDS_PLAN without touching the record, and the caller lists every planless series
 * among the published records (m3_aggst_want); Python groups them by the labels the rules
 * read (csrc/plangroup.c), matches rules once per group and installs each group's plan for
 * all its series at once (m3_aggst_install_many: per series exactly m3_aggst_install_group);
 * the record is then drained normally.
 * With a plan: the raw samples go to the open blocks unless the plan drops them, then to
 * every cell (m3_agg_apply). A record may be applied again after its owner was killed: each
 * cell remembers the last (batch seq, record position) it took (its last_seq and the
 * descriptor's last_pos), so a record already applied to a cell is skipped there. Several
 * records of one batch share a seq, hence the position (lane byte position when draining,
 * batch offset in replay; both grow within a batch). An owner killed part-way through one
 * record's samples on a cell would leave a prefix applied under the old (seq, pos), counted
 * again when the record is re-drained; so before a record touches a cell, what it can change
 * there (the cell header and its samples' window slots, or the whole cell if it may evict:
 * m3_agg_undo_save) is copied to the shard's undo buffer with the cell's last_pos and the
 * spill count, and m3_aggst_recover puts it back if the owner died before the apply
 * finished: the record is then applied whole, once. (Group cells, fed by ROLLUP_IN records,
 * use csrc/rollup.c's scratch-and-copy-back instead.) Windows a sample forces out of a cell's
 * ring early (eviction) are finalised at once: their rows go to the spill, a small ring in
 * the region, and leave with the next finalise.
 *
 * Rules activations: a plan installed with start_ms keeps the plan it replaces as its prev;
 * apply_routed sends samples stamped at or before start_ms down that chain and later ones to
 * the new cells, whatever the order in which they arrive, so the switch happens at a sample
 * time every worker shares (the activation) rather than at a wall-clock moment. The oldest
 * plan's samples are applied first, and a new cell whose pre chain has seen nothing takes its
 * predecessor's pre-transform state (take_pre: Increase goes on across the switch). A changed
 * rollup rule's new group cell whose counter (a lone Add post transform) has no value yet
 * takes the old group cell's total once every window of the old cell is final, and its
 * windows wait until then (seed_post: a rolled-up counter goes on across the change). A prev
 * is finalised with its successor (one slot, one unit, the successor first) and freed once
 * its windows are final and written (release_prev).
 *
 * Finalise in two phases, so a finalised point is durable before its window is forgotten:
 * m3_aggst_prepare computes the rows of every window final at `now` on a scratch copy of each
 * due cell (the cell itself is untouched, post-transform state included) and writes them with
 * the label set of each output series; the caller makes them durable (the aggregated
 * namespace's commit log); m3_aggst_commit then finalises the same cells at the same `now` for
 * real. Between the two, no sample can enter a window that prepare finalised: prepare raises
 * the shard's now_floor to `now` and the drain applies with max(its now, now_floor), so such a
 * sample is late. A crash between the phases only repeats the rows (same timestamps, same
 * values: the query merge keeps one).
 *
 * Crash safety: an install writes the block, then the plan entry (flags last); a killed
 * installer leaves the entry unresolved and the block leaked (one per crash). m3_aggst_recover
 * re-checks every plan's block and cells (m3_agg_cell_check) and drops plans it cannot trust
 * (they are asked for again), after rolling back the cell an apply was interrupted on (the
 * undo buffer above).
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "seg_int.h"

#define AGGST_MAGIC 0x4741334du /* "M3AG" */
#define PLAN_MAGIC 0x4e414c50u  /* "PLAN" */
#define AGGST_HDR 4096
#define SHARD_HDR_BYTES 320
#define ARENA_FIRST 64          /* offset 0 means none: the first bytes are never used */
#define TMP_ROWS 256

enum { PE_RESOLVED = 1, PE_DROP_RAW = 2 };

typedef struct aggst_hdr {
    uint32_t magic;
    uint32_t version;
    uint64_t size;
    uint32_t num_shards;
    uint32_t slots;          /* plan entries per shard = the segment's slot capacity */
    uint64_t arena_bytes;    /* per shard */
    uint64_t region_bytes;
    uint64_t table_off;      /* offsets inside a region */
    uint64_t spill_off;
    uint64_t arena_off;
    uint64_t seg_checksum;   /* the segment this store belongs to */
} aggst_hdr;

typedef struct aggst_shard {
    uint64_t bump;           /* next never-used arena byte */
    uint64_t free_head;      /* freed blocks, linked through next */
    uint64_t retiring;       /* replaced blocks with open windows, linked through next */
    int64_t now_floor;       /* the drain applies with now >= it (two-phase finalise) */
    uint32_t spill_n;        /* rows in the spill */
    uint32_t round;          /* ask round (m3_aggst_want) */
    /* statistics (relaxed; any process reads) */
    uint64_t plans;
    uint64_t cells;
    uint64_t cell_bytes;
    uint64_t applied;
    uint64_t late;
    uint64_t evicted;
    uint64_t ooo;
    uint64_t points;
    uint64_t refused;        /* plans installed without cells: the arena was full */
    uint64_t spill_lost;     /* evicted rows that found the spill full */
    uint64_t raw_dropped;    /* samples not stored raw (drop rules) */
    uint64_t asked;          /* series reported for a plan */
    uint64_t rules_version;  /* rule-set version the shard's plans were made with (Python's) */
    int64_t min_due;         /* no cell is due before it (prepare skips the table until then);
                                the drain lowers it, a whole commit pass recomputes it */
    /* rollup forwarding (csrc/rollup.c): the source side's unfinished forward (fwd 0 =
       none; set before its submit, cleared after its commit), and the group side's forward
       table (arena offset, 0 = not made yet) and counters */
    uint64_t fwd_id;
    int64_t fwd_now;
    uint64_t fwd_first;
    uint64_t fwd_table;
    uint64_t rollup_applied;   /* ROLLUP_IN records applied to group cells */
    uint64_t rollup_dup;       /* ROLLUP_IN records skipped as already applied */
    uint64_t rollup_unmatched; /* ROLLUP_IN records with no group cell of their rule */
    /* undo of the cell a record is being applied to (apply_plan): a copy of the cell as it
       was (arena offset undo_buf, undo_cap bytes), the cell's block and index, its last_pos
       and the spill count before; valid while undo_state is 1 */
    uint64_t undo_buf;
    uint64_t undo_cap;
    uint64_t undo_blk;
    uint64_t undo_last_pos;
    uint32_t undo_k;
    uint32_t undo_state;
    uint32_t undo_spill_n;
    uint32_t prep_next;      /* slots below it were prepared at now_floor (m3_aggst_prepare's
                                last `next`): a window final at now_floor that an eviction
                                spills from such a slot is in that prepare's rows already */
    /* ROLLUP_IN records of this (source) shard's forwards that a group namespace's admission
       refused (its shard full): not rolled up (docs/rules.md "Refused forwards") */
    uint64_t fwd_refused;
    uint64_t spare[7];
} aggst_shard;

typedef struct plan_entry {
    uint32_t gen;            /* series generation the plan is for */
    uint32_t flags;          /* PE_* */
    uint64_t block;          /* arena offset of the plan block, 0 = no cells */
    uint32_t round;          /* last ask round that listed it */
    uint32_t pad;
} plan_entry;

typedef struct plan_blk {
    uint32_t magic;
    uint32_t ncells;
    uint64_t bytes;
    uint64_t next;           /* retiring / free list link */
    uint32_t slot;
    uint32_t gen;
    uint64_t prev;           /* the plan this one replaced at a rules activation (0: none) */
    int64_t from_ms;         /* with prev: samples stamped at or before it go to prev */
} plan_blk;

typedef struct plan_cell {
    uint32_t cell_off;       /* from the block start */
    uint32_t cell_bytes;
    uint32_t labels_off;     /* from the block start; 0 = the series' own labels */
    uint32_t labels_len;
    uint16_t ns_id;          /* namespace the rows go to */
    uint8_t kind;            /* enum m3_agg_kind */
    uint8_t flags;           /* M3_AGGC_* */
    uint32_t rule;           /* 0: fed by the series' samples; else a rollup group cell fed by
                                ROLLUP_IN records of this rule id (csrc/rollup.c) */
    uint64_t last_pos;       /* with the cell's last_seq: the last record applied */
} plan_cell;

typedef struct spill_row {
    uint64_t block;
    uint16_t cell;
    uint16_t agg;
    uint32_t prepared;       /* 1: evicted after a prepare that emitted it (dropped at its
                                commit, never emitted again) */
    int64_t ts;
    double value;
} spill_row;

_Static_assert(sizeof(aggst_hdr) <= AGGST_HDR, "store header");
_Static_assert(sizeof(aggst_shard) == SHARD_HDR_BYTES, "store shard header");
_Static_assert(sizeof(plan_entry) == 24, "plan entry");
_Static_assert(sizeof(plan_blk) == 48, "plan block header");
_Static_assert(sizeof(plan_cell) == 32, "plan cell descriptor");
_Static_assert(sizeof(spill_row) == 32, "spill row");
_Static_assert(sizeof(m3_aggst_row) == 24, "output row");

static const char *const AGG_LOWER[22] = {
    "last", "min", "max", "mean", "median", "count", "sum", "sumsq", "stdev", "p10", "p20",
    "p30", "p40", "p50", "p60", "p70", "p80", "p90", "p95", "p99", "p999", "p9999"};

static inline aggst_hdr *hdr_of(uint8_t *store) { return (aggst_hdr *)store; }
static inline uint8_t *region_of(uint8_t *store, uint32_t shard)
{
    return store + AGGST_HDR + (uint64_t)shard * hdr_of(store)->region_bytes;
}
static inline aggst_shard *sh_of(uint8_t *store, uint32_t shard)
{
    return (aggst_shard *)region_of(store, shard);
}
static inline plan_entry *table_of(uint8_t *store, uint32_t shard)
{
    return (plan_entry *)(region_of(store, shard) + hdr_of(store)->table_off);
}
static inline spill_row *spill_of(uint8_t *store, uint32_t shard)
{
    return (spill_row *)(region_of(store, shard) + hdr_of(store)->spill_off);
}
static inline uint8_t *arena_of(uint8_t *store, uint32_t shard)
{
    return region_of(store, shard) + hdr_of(store)->arena_off;
}
static inline plan_cell *cells_of(plan_blk *b) { return (plan_cell *)(b + 1); }
static inline m3_aggcell *cell_of(plan_blk *b, const plan_cell *pc)
{
    return (m3_aggcell *)((uint8_t *)b + pc->cell_off);
}
static inline void add_stat(uint64_t *p, uint64_t d)
{
    if (d)
        /* Relaxed: a statistic; readers in other processes need no ordering with it. */
        __atomic_store_n(p, *p + d, __ATOMIC_RELAXED);
}

/* ---- layout ------------------------------------------------------------------------------ */

static void layout(const seg_hdr *sh, uint64_t arena_bytes, aggst_hdr *out)
{
    memset(out, 0, sizeof *out);
    out->num_shards = sh->p.num_shards;
    out->slots = (uint32_t)sh->slot_cap;
    out->arena_bytes = arena_bytes;
    out->table_off = SHARD_HDR_BYTES;
    out->spill_off = round8(out->table_off + (uint64_t)out->slots * sizeof(plan_entry));
    out->arena_off = (out->spill_off + M3_AGGST_SPILL * sizeof(spill_row) + 63) & ~63ull;
    out->region_bytes = (out->arena_off + arena_bytes + 4095) & ~4095ull;
    out->size = AGGST_HDR + out->region_bytes * out->num_shards;
    out->seg_checksum = sh->checksum;
}

uint64_t m3_aggst_size(const uint8_t *seg, uint64_t arena_bytes)
{
    if (!seg || arena_bytes < 4096 || arena_bytes > (UINT64_C(1) << 40))
        return 0;
    aggst_hdr h;
    layout(cseg_of(seg), arena_bytes, &h);
    return h.size;
}

int m3_aggst_init(uint8_t *store, uint64_t size, const uint8_t *seg, uint64_t arena_bytes)
{
    if (!store || !seg || m3_aggst_size(seg, arena_bytes) != size)
        return M3_EINVAL;
    aggst_hdr h;
    layout(cseg_of(seg), arena_bytes, &h);
    h.magic = AGGST_MAGIC;
    h.version = M3_AGGST_VERSION;
    memcpy(store, &h, sizeof h);
    for (uint32_t s = 0; s < h.num_shards; s++)
        sh_of(store, s)->bump = ARENA_FIRST;  /* the rest of the file is zero (ftruncate) */
    return M3_OK;
}

int m3_aggst_check(const uint8_t *store, uint64_t size, const uint8_t *seg)
{
    if (!store || !seg || size < AGGST_HDR)
        return M3_EINVAL;
    const aggst_hdr *h = (const aggst_hdr *)store;
    if (h->magic != AGGST_MAGIC)
        return M3_ECORRUPT;
    if (h->version != M3_AGGST_VERSION)
        return M3_EVERSION;
    aggst_hdr want;
    layout(cseg_of(seg), h->arena_bytes, &want);
    if (h->size != size || want.size != size || want.seg_checksum != h->seg_checksum ||
        want.slots != h->slots || want.num_shards != h->num_shards)
        return M3_ECORRUPT;
    return M3_OK;
}

/* ---- allocation -------------------------------------------------------------------------- */

static uint64_t blk_alloc(uint8_t *store, uint32_t shard, uint64_t bytes)
{
    aggst_shard *sh = sh_of(store, shard);
    uint8_t *arena = arena_of(store, shard);
    uint64_t *link = &sh->free_head;
    uint64_t cap = hdr_of(store)->arena_bytes;
    for (int hops = 0; *link && hops < 64; hops++) {
        if (*link % 8 || *link < ARENA_FIRST || *link + sizeof(plan_blk) > cap) {
            *link = 0;  /* a link a killed owner left half-written: cut the list */
            break;
        }
        plan_blk *b = (plan_blk *)(arena + *link);
        if (b->bytes >= bytes && b->bytes <= bytes + bytes / 4) {
            uint64_t off = *link;
            *link = b->next;
            return off;
        }
        link = &b->next;
    }
    if (sh->bump + bytes > cap)
        return 0;
    if (arena_commit(arena, ARENA_FIRST, sh->bump, bytes, cap))
        return 0;  /* /dev/shm is full: as if the cell arena were (not a SIGBUS later) */
    uint64_t off = sh->bump;
    sh->bump += bytes;
    return off;
}

static plan_blk *blk_at(uint8_t *store, uint32_t shard, uint64_t off)
{
    uint64_t cap = hdr_of(store)->arena_bytes;
    if (off < ARENA_FIRST || off % 8 || off + sizeof(plan_blk) > cap)
        return NULL;
    plan_blk *b = (plan_blk *)(arena_of(store, shard) + off);
    if (b->magic != PLAN_MAGIC || b->bytes > cap - off ||
        sizeof(plan_blk) + (uint64_t)b->ncells * sizeof(plan_cell) > b->bytes)
        return NULL;
    return b;
}

static int64_t blk_max_admission(plan_blk *b)
{
    int64_t adm = 0;
    for (uint32_t k = 0; k < b->ncells; k++) {
        const m3_aggcell *c = cell_of(b, &cells_of(b)[k]);
        if (c->p.admission_ms > adm)
            adm = c->p.admission_ms;
    }
    return adm;
}

static int blk_open(plan_blk *b)
{
    for (uint32_t k = 0; k < b->ncells; k++) {
        const m3_aggcell *c = cell_of(b, &cells_of(b)[k]);
        if (c->hi_widx != INT64_MIN && c->lo_widx <= c->hi_widx)
            return 1;
    }
    return 0;
}

static void blk_free(uint8_t *store, uint32_t shard, uint64_t off)
{
    aggst_shard *sh = sh_of(store, shard);
    plan_blk *b = (plan_blk *)(arena_of(store, shard) + off);
    add_stat(&sh->cells, (uint64_t)0 - b->ncells);
    add_stat(&sh->cell_bytes, (uint64_t)0 - b->bytes);
    add_stat(&sh->plans, (uint64_t)0 - 1);
    b->magic = 0;
    b->next = sh->free_head;
    sh->free_head = off;
}

/* A block leaves its plan entry: freed now if no window is open and no spill row names it,
   else kept on the retiring list until the finalise empties it. The plans it replaced (its
   prev chain) leave with it, each on its own. */
static void blk_retire(uint8_t *store, uint32_t shard, uint64_t off)
{
    aggst_shard *sh = sh_of(store, shard);
    for (int depth = 0; off && depth < 64; depth++) {
        plan_blk *b = blk_at(store, shard, off);
        if (!b)
            return;
        uint64_t prev = b->prev;
        b->prev = 0;  /* the retiring list finalises each block alone */
        int named = 0;
        for (uint32_t i = 0; i < sh->spill_n && !named; i++)
            named = spill_of(store, shard)[i].block == off;
        if (!named && !blk_open(b)) {
            blk_free(store, shard, off);
        } else {
            b->next = sh->retiring;
            sh->retiring = off;
        }
        off = prev;
    }
}

/* ---- plans ------------------------------------------------------------------------------- */

static int slot_live(const shard_view *v, uint32_t slot, uint32_t gen)
{
    if (slot >= v->h->slot_cap || slot >= v->sh->nseries)
        return 0;
    const series_slot *s = &v->slots[slot];
    return s->state == SLOT_LIVE && s->gen == gen;
}

int m3_aggst_install(uint8_t *seg, uint8_t *store, uint32_t shard, uint32_t slot, uint32_t gen,
                     uint32_t flags, const m3_agg_params *params, const uint32_t *meta,
                     const uint8_t *labels, const uint64_t *loffs, uint32_t ncells,
                     int64_t start_ms)
{
    return m3_aggst_install_group(seg, store, shard, slot, gen, flags, params, meta, labels,
                                  loffs, NULL, ncells, start_ms);
}

/* The bytes of a plan block for these cells (0: invalid arguments). */
static uint64_t plan_bytes(uint8_t *seg, uint8_t *store, uint32_t shard, uint32_t flags,
                           const m3_agg_params *params, const uint32_t *meta,
                           const uint8_t *labels, const uint64_t *loffs, uint32_t ncells)
{
    if (!seg || !store || shard >= hdr_of(store)->num_shards ||
        (ncells && (!params || !meta || !loffs)) || ncells > 4096 ||
        (flags & ~(uint32_t)M3_PLAN_DROP_RAW))
        return 0;
    uint64_t bytes = sizeof(plan_blk) + (uint64_t)ncells * sizeof(plan_cell);
    uint64_t lbytes = 0;
    for (uint32_t k = 0; k < ncells; k++) {
        uint64_t cb = m3_agg_cell_bytes(&params[k]);
        if (!cb || loffs[k + 1] < loffs[k] || loffs[k + 1] - loffs[k] > 65535 ||
            (loffs[k + 1] > loffs[k] && !labels) || ((meta[k] >> 16) & 0xff) > M3_AGGK_ROLLUP)
            return 0;
        lbytes += round8(loffs[k + 1] - loffs[k]);
        bytes += cb;
    }
    bytes += lbytes;
    return bytes > UINT32_MAX ? 0 : bytes;
}

static int install_one(uint8_t *seg, uint8_t *store, uint32_t shard, uint32_t slot,
                       uint32_t gen, uint32_t flags, const m3_agg_params *params,
                       const uint32_t *meta, const uint8_t *labels, const uint64_t *loffs,
                       const uint32_t *rules, uint32_t ncells, int64_t start_ms,
                       uint64_t bytes);

int m3_aggst_install_group(uint8_t *seg, uint8_t *store, uint32_t shard, uint32_t slot,
                           uint32_t gen, uint32_t flags, const m3_agg_params *params,
                           const uint32_t *meta, const uint8_t *labels, const uint64_t *loffs,
                           const uint32_t *rules, uint32_t ncells, int64_t start_ms)
{
    uint64_t bytes = plan_bytes(seg, store, shard, flags, params, meta, labels, loffs, ncells);
    if (!bytes || slot >= hdr_of(store)->slots)
        return M3_EINVAL;
    return install_one(seg, store, shard, slot, gen, flags, params, meta, labels, loffs, rules,
                       ncells, start_ms, bytes);
}

int m3_aggst_install_many(uint8_t *seg, uint8_t *store, const uint32_t *shards,
                          const uint32_t *slots, const uint32_t *gens, size_t n, uint32_t flags,
                          const m3_agg_params *params, const uint32_t *meta,
                          const uint8_t *labels, const uint64_t *loffs, const uint32_t *rules,
                          uint32_t ncells, int64_t start_ms, size_t *installed)
{
    uint64_t bytes = plan_bytes(seg, store, 0, flags, params, meta, labels, loffs, ncells);
    if (!bytes || (n && (!shards || !slots || !gens)) || !installed)
        return M3_EINVAL;
    *installed = 0;
    for (size_t i = 0; i < n; i++)
        if (shards[i] >= hdr_of(store)->num_shards || slots[i] >= hdr_of(store)->slots)
            return M3_EINVAL;
    /* one plan after the other, each under its shard's lock on its own (the finalise may take
       the shard between two), each exactly what m3_aggst_install_group would make */
    for (size_t i = 0; i < n; i++)
        if (install_one(seg, store, shards[i], slots[i], gens[i], flags, params, meta, labels,
                        loffs, rules, ncells, start_ms, bytes) == M3_OK)
            (*installed)++;
    return M3_OK;
}

static int install_one(uint8_t *seg, uint8_t *store, uint32_t shard, uint32_t slot,
                       uint32_t gen, uint32_t flags, const m3_agg_params *params,
                       const uint32_t *meta, const uint8_t *labels, const uint64_t *loffs,
                       const uint32_t *rules, uint32_t ncells, int64_t start_ms,
                       uint64_t bytes)
{
    m3_shard_lock(seg, shard);
    shard_view v = shard_view_of(seg, shard);
    if (!slot_live(&v, slot, gen)) {
        m3_shard_unlock(seg, shard);
        return M3_ENOENT;
    }
    aggst_shard *sh = sh_of(store, shard);
    plan_entry *pe = &table_of(store, shard)[slot];
    uint32_t pflags = PE_RESOLVED | ((flags & M3_PLAN_DROP_RAW) ? PE_DROP_RAW : 0);
    /* A plan replacing the same series' plan at a rules activation keeps the old block as its
       prev: samples stamped at or before start_ms still go there (m3_aggst_apply_rec), until
       the finalise has closed every window of it (release_prev). The entry names the old
       block until the new one is complete, so a killed installer leaves the old plan whole. */
    uint64_t keep = 0;
    plan_blk *cur = (pe->flags & PE_RESOLVED) && pe->gen == gen && pe->block
                        ? blk_at(store, shard, pe->block) : NULL;
    if (start_ms != INT64_MIN && cur && cur->from_ms == start_ms) {
        /* installed for this activation already (a replan repeated after its owner was
           killed): replacing it would split its windows after start_ms in two */
        m3_shard_unlock(seg, shard);
        return M3_OK;
    }
    if (start_ms != INT64_MIN && cur)
        keep = pe->block;
    if (!keep) {
        /* the entry stops naming its old block before anything else changes */
        pe->flags = 0;
        if (pe->block) {
            uint64_t old = pe->block;
            pe->block = 0;
            blk_retire(store, shard, old);
        }
    }
    uint64_t off = ncells || keep ? blk_alloc(store, shard, bytes) : 0;
    int rc = M3_OK;
    if ((ncells || keep) && !off) {
        add_stat(&sh->refused, 1);
        rc = M3_ENOSPC;  /* resolved without cells: raw only, not asked again */
        if (keep) {
            /* the old plan goes on whole: this version's cells are refused for the series */
            m3_shard_unlock(seg, shard);
            return rc;
        }
    } else if (ncells || keep) {
        plan_blk *b = (plan_blk *)(arena_of(store, shard) + off);
        memset(b, 0, sizeof *b + (uint64_t)ncells * sizeof(plan_cell));
        b->ncells = ncells;
        b->bytes = bytes;
        b->slot = slot;
        b->gen = gen;
        b->prev = keep;
        b->from_ms = start_ms != INT64_MIN ? start_ms : 0;
        if (keep) {
            /* the finalise must look at the slot when the old plan can be freed, even if no
               cell is due then (min_due lets it skip the table otherwise) */
            int64_t at = start_ms + blk_max_admission(blk_at(store, shard, keep));
            if (at < sh->min_due)
                sh->min_due = at;
        }
        uint64_t at = sizeof(plan_blk) + (uint64_t)ncells * sizeof(plan_cell);
        for (uint32_t k = 0; k < ncells; k++) {
            plan_cell *pc = &cells_of(b)[k];
            uint32_t len = (uint32_t)(loffs[k + 1] - loffs[k]);
            pc->ns_id = (uint16_t)(meta[k] & 0xffff);
            pc->kind = (uint8_t)((meta[k] >> 16) & 0xff);
            pc->flags = (uint8_t)(meta[k] >> 24);
            pc->rule = rules ? rules[k] : 0;
            if (len) {
                pc->labels_off = (uint32_t)at;
                pc->labels_len = len;
                memcpy((uint8_t *)b + at, labels + loffs[k], len);
                at += round8(len);
            }
        }
        for (uint32_t k = 0; k < ncells; k++) {
            plan_cell *pc = &cells_of(b)[k];
            uint64_t cb = m3_agg_cell_bytes(&params[k]);
            pc->cell_off = (uint32_t)at;
            pc->cell_bytes = (uint32_t)cb;
            m3_agg_cell_init((uint8_t *)b + at, cb, &params[k]);
            if (start_ms != INT64_MIN) {
                /* windows ending at or before start_ms belong to the plan this one replaces:
                   final here from the start, so a sample for them is late, not counted twice */
                m3_aggcell *c = (m3_aggcell *)((uint8_t *)b + at);
                int64_t q = start_ms / params[k].res_ms;
                if (start_ms % params[k].res_ms < 0)
                    q--;
                c->done_widx = q - 1;
            }
            at += cb;
        }
        b->magic = PLAN_MAGIC;
        pe->block = off;  /* one store: the entry names the old plan or the new one */
        add_stat(&sh->plans, 1);
        add_stat(&sh->cells, ncells);
        add_stat(&sh->cell_bytes, bytes);
    }
    pe->gen = gen;
    pe->flags = pflags;  /* last: an installer killed before it leaves the plan unresolved */
    m3_shard_unlock(seg, shard);
    return rc;
}

int m3_aggst_plan(uint8_t *store, uint32_t shard, uint32_t slot, uint32_t *gen,
                  uint32_t *flags, uint32_t *ncells)
{
    if (!store || shard >= hdr_of(store)->num_shards || slot >= hdr_of(store)->slots)
        return M3_EINVAL;
    plan_entry *pe = &table_of(store, shard)[slot];
    plan_blk *b = pe->block ? blk_at(store, shard, pe->block) : NULL;
    *gen = pe->gen;
    *flags = pe->flags & (PE_RESOLVED | PE_DROP_RAW);
    *ncells = b ? b->ncells : 0;
    return M3_OK;
}

uint32_t m3_aggst_next_round(uint8_t *store, uint32_t shard)
{
    aggst_shard *sh = sh_of(store, shard);
    sh->round = sh->round + 1 ? sh->round + 1 : 1;
    return sh->round;
}

int m3_aggst_want(uint8_t *base, uint8_t *store, const m3_rec *r, uint32_t round,
                  uint32_t *slot, uint32_t *gen)
{
    shard_view v = shard_view_of(base, r->shard);
    int64_t s = m3_series_resolve(&v, r);
    if (s < 0)
        return 0;
    plan_entry *pe = &table_of(store, r->shard)[s];
    uint32_t g = v.slots[s].gen;
    if ((pe->flags & PE_RESOLVED) && pe->gen == g)
        return 0;
    if (pe->round == round)
        return 0;
    pe->round = round;
    *slot = (uint32_t)s;
    *gen = g;
    add_stat(&sh_of(store, r->shard)->asked, 1);
    return 1;
}

/* ---- applying ---------------------------------------------------------------------------- */

static void spill_rows(uint8_t *store, uint32_t shard, uint64_t block, uint32_t k,
                       const m3_agg_out *rows, size_t n)
{
    aggst_shard *sh = sh_of(store, shard);
    spill_row *sp = spill_of(store, shard);
    /* A window final at now_floor in a slot the pending prepare covered is in that prepare's
       rows (it was in the ring then, and no sample entered it since): the eviction only
       moved it out of the ring before the commit. Its spilled copy is marked, and the commit
       of those rows drops it, so it is written (or forwarded) once. */
    plan_blk *b = blk_at(store, shard, block);
    int64_t adm = b && k < b->ncells ? cell_of(b, &cells_of(b)[k])->p.admission_ms : 0;
    int covered = b && b->slot < sh->prep_next;
    for (size_t i = 0; i < n; i++) {
        if (sh->spill_n >= M3_AGGST_SPILL) {
            add_stat(&sh->spill_lost, n - i);
            return;
        }
        spill_row *o = &sp[sh->spill_n];
        o->block = block;
        o->cell = (uint16_t)k;
        o->agg = (uint16_t)rows[i].agg;
        o->prepared = covered && rows[i].ts + adm <= sh->now_floor;
        o->ts = rows[i].ts;
        o->value = rows[i].value;
        sh->spill_n++;
    }
}

/* The shard's undo buffer, at least `bytes` long, made in the arena on first use (and again,
   larger, for a larger cell: the old one leaks, once per size increase). NULL if the arena is
   full: the cell is then applied without an undo, as exact as before only if its owner is
   not killed in the middle. */
static uint8_t *undo_buf(uint8_t *store, uint32_t shard, uint64_t bytes)
{
    aggst_shard *sh = sh_of(store, shard);
    if (sh->undo_buf && sh->undo_cap >= bytes)
        return arena_of(store, shard) + sh->undo_buf;
    uint64_t cap = round8(bytes < 4096 ? 4096 : bytes);
    uint64_t off = blk_alloc(store, shard, cap);
    if (!off)
        return NULL;
    sh->undo_state = 0;
    sh->undo_cap = cap;
    sh->undo_buf = off;
    return arena_of(store, shard) + off;
}

/* After a killed owner: a cell left part-way through a record gets its state from before the
   record back (so the re-drained record counts once). Idempotent: killed again in here, the
   next recovery does it again. */
static void undo_restore(uint8_t *store, uint32_t shard)
{
    aggst_shard *sh = sh_of(store, shard);
    uint64_t cap = hdr_of(store)->arena_bytes;
    if (sh->undo_state != 1)
        return;
    plan_blk *b = blk_at(store, shard, sh->undo_blk);
    if (b && sh->undo_k < b->ncells && sh->undo_buf >= ARENA_FIRST && sh->undo_buf % 8 == 0 &&
        sh->undo_cap <= cap && sh->undo_buf <= cap - sh->undo_cap) {
        plan_cell *pc = &cells_of(b)[sh->undo_k];
        if ((uint64_t)pc->cell_off + pc->cell_bytes <= b->bytes &&
            m3_agg_undo_restore((uint8_t *)cell_of(b, pc), pc->cell_bytes,
                                arena_of(store, shard) + sh->undo_buf, sh->undo_cap) == M3_OK) {
            pc->last_pos = sh->undo_last_pos;
            if (sh->undo_spill_n <= sh->spill_n)
                sh->spill_n = sh->undo_spill_n;  /* the rows the interrupted apply spilled */
        }
    }
    /* Compiler-only ordering: the restored cell is in memory before the undo is dropped. */
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    sh->undo_state = 0;
}

/* Rules activation: cell k of plan b has an ordered pre chain that has taken no sample yet
   and b replaced older plans (prev): it takes the pre-transform state of the cell with the
   same pre chain down that chain that saw the latest sample (m3_agg_take_pre), so the
   series' increment across the activation is counted once, by the new cell. Older plans take
   only samples stamped at or before the activation and are applied first (apply_routed). */
static void take_pre(uint8_t *store, uint32_t shard, plan_blk *b, m3_aggcell *c,
                     uint64_t cap)
{
    int64_t seen_ts, best_ts = 0;
    if (!b->prev || c->p.pre[0] == M3_XF_NONE || m3_agg_pre_last((uint8_t *)c, cap, &seen_ts))
        return;
    m3_aggcell *best = NULL;
    uint64_t best_cap = 0;
    plan_blk *p = b;
    for (int depth = 0; p->prev && depth < 64; depth++) {
        p = blk_at(store, shard, p->prev);
        if (!p)
            break;
        for (uint32_t k = 0; k < p->ncells; k++) {
            plan_cell *pc = &cells_of(p)[k];
            m3_aggcell *o = cell_of(p, pc);
            if (pc->rule || memcmp(o->p.pre, c->p.pre, sizeof c->p.pre) ||
                !m3_agg_pre_last((uint8_t *)o, pc->cell_bytes, &seen_ts))
                continue;
            if (!best || seen_ts > best_ts) {
                best = o;
                best_ts = seen_ts;
                best_cap = pc->cell_bytes;
            }
        }
    }
    if (best)
        m3_agg_take_pre((uint8_t *)c, cap, (const uint8_t *)best, best_cap);
}

static void apply_plan(uint8_t *store, uint32_t shard, uint64_t off, plan_blk *b,
                       const int64_t *ts, const double *vals, uint32_t nsamples, uint64_t seq,
                       uint64_t pos, int64_t now)
{
    aggst_shard *sh = sh_of(store, shard);
    m3_agg_out tmp[TMP_ROWS];
    uint64_t applied = 0, late = 0, evicted = 0, ooo = 0;
    for (uint32_t k = 0; k < b->ncells; k++) {
        plan_cell *pc = &cells_of(b)[k];
        m3_aggcell *c = cell_of(b, pc);
        if (pc->rule)
            continue;  /* a rollup group cell: fed by ROLLUP_IN records only */
        if (seq && (seq < c->last_seq || (seq == c->last_seq && pos <= pc->last_pos))) {
            c->dup += nsamples;
            continue;
        }
        uint64_t a0 = c->applied, l0 = c->late, e0 = c->evicted, o0 = c->ooo;
        uint8_t *undo = undo_buf(store, shard, pc->cell_bytes + 64);
        if (undo) {
            sh->undo_blk = off;
            sh->undo_k = k;
            sh->undo_last_pos = pc->last_pos;
            sh->undo_spill_n = sh->spill_n;
            if (!m3_agg_undo_save((const uint8_t *)c, pc->cell_bytes, ts, nsamples, undo,
                                  sh->undo_cap))
                memset(undo, 0, 16);  /* cannot happen (the buffer holds the whole cell) */
            /* Compiler-only ordering (owner-private words; a SIGKILLed owner's completed
               stores stay in the mapping): the copy and its identity are in memory before the
               state says they are valid, and that before the cell is touched. */
            __atomic_signal_fence(__ATOMIC_SEQ_CST);
            sh->undo_state = 1;
            __atomic_signal_fence(__ATOMIC_SEQ_CST);
        }
        take_pre(store, shard, b, c, pc->cell_bytes);  /* under the undo: part of the apply */
        size_t start = 0;
        for (;;) {
            size_t nout = 0, done = 0;
            int rc = m3_agg_apply((uint8_t *)c, pc->cell_bytes, 1, 0, 0, ts + start,
                                  vals + start, nsamples - start, now, tmp, TMP_ROWS, &nout,
                                  &done);
            spill_rows(store, shard, off, k, tmp, nout);
            start += done;
            if (rc != M3_ENOSPC || (nout == 0 && done == 0))
                break;
        }
        c->last_seq = seq;
        pc->last_pos = pos;
        /* Compiler-only ordering: the whole apply is in memory before the undo is dropped. */
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        sh->undo_state = 0;
        if (c->due_ms < sh->min_due)
            sh->min_due = c->due_ms;
        applied += c->applied - a0;
        late += c->late - l0;
        evicted += c->evicted - e0;
        ooo += c->ooo - o0;
    }
    add_stat(&sh->applied, applied);
    add_stat(&sh->late, late);
    add_stat(&sh->evicted, evicted);
    add_stat(&sh->ooo, ooo);
}

/* A record's samples to its plan: a plan that replaced another at a rules activation (prev,
   from_ms) takes the samples stamped after from_ms, and the older plans the rest, each by the
   same rule down its chain. So every worker switches at the activation whatever the order in
   which samples arrive: a sample stamped before it and arriving late still reaches the old
   cells (its window is open there), one stamped after it and arriving early reaches the new
   cells only. The oldest plan's part is applied first, so a new cell that takes over its
   predecessor's pre-transform state (take_pre) finds the record's earlier samples in it.
   Samples stay in record order within each part. */
static void apply_routed(uint8_t *store, uint32_t shard, uint64_t off, plan_blk *b,
                         const m3_rec *r, uint64_t seq, uint64_t pos, int64_t now)
{
    const int64_t *ts = (const int64_t *)((const uint8_t *)(r + 1) + round8(r->labels_len));
    const double *vals = (const double *)(ts + r->nsamples);
    uint32_t n = r->nsamples;
    enum { DEPTH = 64 };
    plan_blk *blks[DEPTH];
    uint64_t offs[DEPTH];
    uint32_t nb = 0;
    for (plan_blk *x = b; x && nb < DEPTH;) {
        blks[nb] = x;
        offs[nb++] = off;
        if (!x->prev)
            break;
        off = x->prev;
        x = blk_at(store, shard, off);
    }
    if (nb <= 1 || n > M3_REC_MAX_SAMPLES) {
        if (n)
            apply_plan(store, shard, offs[0], b, ts, vals, n, seq, pos, now);
        return;
    }
    uint8_t at[M3_REC_MAX_SAMPLES];
    for (uint32_t i = 0; i < n; i++) {
        uint32_t j = 0;
        while (j + 1 < nb && ts[i] <= blks[j]->from_ms)
            j++;
        at[i] = (uint8_t)j;
    }
    int64_t pts[M3_REC_MAX_SAMPLES];
    double pv[M3_REC_MAX_SAMPLES];
    for (uint32_t j = nb; j-- > 0;) {
        uint32_t m = 0;
        for (uint32_t i = 0; i < n; i++)
            if (at[i] == j) {
                pts[m] = ts[i];
                pv[m++] = vals[i];
            }
        if (m)
            apply_plan(store, shard, offs[j], blks[j], pts, pv, m, seq, pos, now);
    }
}

/* Set by m3_shard_apply_batch_agg_cells for the calls it makes on this thread: replay of a
   batch whose raw samples a loaded snapshot already holds (csrc/snapshot.c) feeds the cells
   only. */
static _Thread_local int cells_only;

/* The shard's forward table (csrc/rollup.c), made in the arena on first use: its scratch
   holds the largest cell there can be. NULL if the arena is full. */
static uint8_t *fwd_table(uint8_t *store, uint32_t shard, uint32_t num_sources)
{
    aggst_shard *sh = sh_of(store, shard);
    uint64_t bytes = m3_fwd_table_bytes(num_sources, M3_AGGST_FWD_SCRATCH);
    if (sh->fwd_table) {
        uint8_t *t = arena_of(store, shard) + sh->fwd_table;
        if (sh->fwd_table + bytes <= hdr_of(store)->arena_bytes &&
            m3_fwd_table_check(t, bytes) == M3_OK)
            return t;
        sh->fwd_table = 0;  /* cannot be trusted: a fresh one (forwards may repeat once) */
    }
    uint64_t off = blk_alloc(store, shard, round8(bytes));
    if (!off)
        return NULL;
    uint8_t *t = arena_of(store, shard) + off;
    if (m3_fwd_table_init(t, bytes, num_sources, M3_AGGST_FWD_SCRATCH) != M3_OK)
        return NULL;
    sh->fwd_table = off;  /* last: a killed owner leaks the block, never half a table */
    return t;
}

/* Replay after a full restart, on the replaying thread (m3_aggst_replay_mode): `on`, and the
   last input window end a replayed ROLLUP_IN row may have (later ones are forwarded again by
   their sources, which re-aggregate them from the replayed raw samples). */
static _Thread_local int replay_on;
static _Thread_local int64_t replay_max_end = INT64_MAX;

void m3_aggst_replay_mode(int on, int64_t rollup_max_end)
{
    replay_on = on;
    replay_max_end = on ? rollup_max_end : INT64_MAX;
    m3_agg_replay_late(on);
}

/* The block of a plan chain that takes a sample (or window end) stamped ts: the newest whose
   activation is before ts (apply_routed's rule, one timestamp). */
static plan_blk *blk_for_ts(uint8_t *store, uint32_t shard, uint64_t *off, int64_t ts)
{
    plan_blk *b = *off ? blk_at(store, shard, *off) : NULL;
    for (int depth = 0; b && b->prev && ts <= b->from_ms && depth < 64; depth++) {
        plan_blk *p = blk_at(store, shard, b->prev);
        if (!p)
            break;
        *off = b->prev;
        b = p;
    }
    return b;
}

/* Replay: ROLLUP_IN record r without the rows whose window ends after replay_max_end, in buf
   (same identity); NULL if none is left. */
static const m3_rec *replay_rows(const m3_rec *r, uint8_t *buf, size_t cap)
{
    const int64_t *ts = (const int64_t *)((const uint8_t *)(r + 1) + round8(r->labels_len));
    const double *v = (const double *)(ts + r->nsamples);
    uint32_t n = 0;
    for (uint32_t i = 0; i < r->nsamples; i++)
        n += ts[i] <= replay_max_end;
    if (n == r->nsamples)
        return r;
    uint64_t bytes = m3_rollup_rec_bytes(r->labels_len, n);
    if (n == 0 || bytes > cap)
        return NULL;
    m3_rec *o = (m3_rec *)buf;
    size_t head = sizeof *r + round8(r->labels_len);
    memcpy(o, r, head);
    o->len = (uint32_t)bytes;
    o->nsamples = n;
    int64_t *ots = (int64_t *)(buf + head);
    double *ov = (double *)(ots + n);
    for (uint32_t i = 0, j = 0; i < r->nsamples; i++)
        if (ts[i] <= replay_max_end) {
            ots[j] = ts[i];
            ov[j++] = v[i];
        }
    memcpy(buf + bytes - M3_ROLLUP_TAIL_BYTES, m3_rollup_tail_of(r), M3_ROLLUP_TAIL_BYTES);
    return o;
}

/* A ROLLUP_IN record: to the group cell of its rule in the group series' plan, exactly once;
   never to the blocks. After a rules activation the group's plan is a chain (a group whose
   rules changed keeps its old plan as prev): the record goes to the block of its windows,
   like a sample (its source splits its records at every activation it knows, so one record's
   windows are on one side). */
static int apply_rollup_in(uint8_t *base, uint8_t *store, const shard_view *v, uint32_t slot,
                           const plan_entry *pe, const m3_rec *r, int64_t now)
{
    (void)slot;
    aggst_shard *sh = sh_of(store, r->shard);
    const m3_rollup_tail *tl = m3_rollup_tail_of(r);
    if (replay_on && replay_max_end != INT64_MAX) {
        static _Thread_local uint64_t rbuf[(sizeof(m3_rec) + 65536 + 16 * M3_REC_MAX_SAMPLES +
                                            M3_ROLLUP_TAIL_BYTES) / 8 + 1];
        if (m3_rollup_check(r, r->len, v->h->p.num_shards, v->h->p.num_producers)) {
            add_stat(&sh->rollup_unmatched, 1);
            return M3_OK;
        }
        r = replay_rows(r, (uint8_t *)rbuf, sizeof rbuf);
        if (!r)
            return M3_OK;  /* every row is forwarded again */
    }
    const int64_t *rts = (const int64_t *)((const uint8_t *)(r + 1) + round8(r->labels_len));
    uint64_t boff = pe->block;
    plan_blk *b = blk_for_ts(store, r->shard, &boff, r->nsamples ? rts[0] : INT64_MAX);
    uint32_t k = 0;
    for (; b && k < b->ncells; k++)
        if (cells_of(b)[k].rule == tl->rule &&
            cell_of(b, &cells_of(b)[k])->p.res_ms == tl->res_ms)
            break;
    if (!b || k == b->ncells) {
        add_stat(&sh->rollup_unmatched, 1);
        return M3_OK;
    }
    uint8_t *t = fwd_table(store, r->shard, v->h->p.num_producers);
    if (!t || m3_rollup_check(r, r->len, v->h->p.num_shards, v->h->p.num_producers) ||
        cells_of(b)[k].cell_bytes > M3_AGGST_FWD_SCRATCH) {
        add_stat(&sh->rollup_unmatched, 1);
        return M3_OK;
    }
    enum { CAP = (M3_AGG_MAX_WINDOWS + M3_REC_MAX_SAMPLES) * 22 };
    static _Thread_local m3_agg_out out[CAP];
    size_t nout = 0;
    plan_cell *pc = &cells_of(b)[k];
    m3_aggcell *c = cell_of(b, pc);
    uint64_t a0 = c->applied, l0 = c->late, e0 = c->evicted;
    int rc = m3_rollup_apply(t, r, (uint8_t *)c, pc->cell_bytes, 1, 0, now, out, CAP, &nout);
    if (rc < 0) {
        add_stat(&sh->rollup_unmatched, 1);
        return M3_OK;
    }
    spill_rows(store, r->shard, boff, k, out, nout);
    if (c->due_ms < sh->min_due)
        sh->min_due = c->due_ms;  /* the finalise must look at this shard by then */
    add_stat(rc ? &sh->rollup_applied : &sh->rollup_dup, 1);
    add_stat(&sh->applied, c->applied - a0);
    add_stat(&sh->late, c->late - l0);
    add_stat(&sh->evicted, c->evicted - e0);
    return M3_OK;
}

void m3_aggst_fwd_pending(uint8_t *store, uint32_t shard, uint64_t *fwd, int64_t *now_ms,
                          uint32_t *first)
{
    aggst_shard *sh = sh_of(store, shard);
    *fwd = sh->fwd_id;
    *now_ms = sh->fwd_now;
    *first = (uint32_t)sh->fwd_first;
}

void m3_aggst_set_fwd_pending(uint8_t *store, uint32_t shard, uint64_t fwd, int64_t now_ms,
                              uint32_t first)
{
    aggst_shard *sh = sh_of(store, shard);
    /* Owner-private words: a killed owner's completed stores stay in the mapping; the id is
       written last when setting and first when clearing (compiler-only ordering). */
    if (fwd) {
        sh->fwd_now = now_ms;
        sh->fwd_first = first;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
    }
    sh->fwd_id = fwd;
}

/* Replay: a point of a rollup group series (its group cells' own output, written before the
   crash) seals its group cell: windows up to it were written, and an Add total continues from
   its value (m3_agg_seal). So a group window finalised before a full restart is not emitted
   again with another value, and the counter goes on where it was instead of restarting. */
static void seal_groups(uint8_t *store, uint32_t shard, uint64_t off, const m3_rec *r)
{
    const int64_t *ts = (const int64_t *)((const uint8_t *)(r + 1) + round8(r->labels_len));
    const double *v = (const double *)(ts + r->nsamples);
    uint32_t last = 0;
    for (uint32_t i = 1; i < r->nsamples; i++)
        if (ts[i] >= ts[last])
            last = i;
    plan_blk *b = blk_for_ts(store, shard, &off, ts[last]);
    for (uint32_t k = 0; b && k < b->ncells; k++) {
        plan_cell *pc = &cells_of(b)[k];
        if (pc->rule && pc->kind == M3_AGGK_OUTPUT && !pc->labels_off &&
            !(pc->flags & M3_AGGC_AGG_LABEL))
            m3_agg_seal((uint8_t *)cell_of(b, pc), pc->cell_bytes, ts[last], v[last]);
    }
}

int m3_aggst_apply_rec(uint8_t *base, uint8_t *store, const m3_rec *r, uint64_t seq,
                       uint64_t pos, int64_t now_ms)
{
    /* (ROLLUP_IN records go to the group cell of the series' plan below: apply_rollup_in) */
    shard_view v = shard_view_of(base, r->shard);
    aggst_shard *sh = sh_of(store, r->shard);
    int64_t slot = m3_series_resolve(&v, r);
    if (slot < 0) {
        __atomic_store_n(&v.sh->dropped, v.sh->dropped + 1, __ATOMIC_RELAXED);
        return M3_ENOSPC;
    }
    plan_entry *pe = &table_of(store, r->shard)[slot];
    if (!(pe->flags & PE_RESOLVED) || pe->gen != v.slots[slot].gen)
        return M3_AGG_NEEDS_PLAN;
    if (r->type == M3_REC_ROLLUP_IN)
        return apply_rollup_in(base, store, &v, (uint32_t)slot, pe, r,
                               now_ms > sh->now_floor ? now_ms : sh->now_floor);
    int rc = M3_OK;
    if (cells_only) {
        /* the raw samples are in the loaded snapshot */
    } else if (pe->flags & PE_DROP_RAW)
        add_stat(&sh->raw_dropped, r->nsamples);
    else if ((rc = m3_series_append(&v, (uint32_t)slot, r)) != M3_OK)
        __atomic_store_n(&v.sh->dropped, v.sh->dropped + 1, __ATOMIC_RELAXED);
    if (pe->block) {
        plan_blk *b = blk_at(store, r->shard, pe->block);
        if (b)
            apply_routed(store, r->shard, pe->block, b, r, seq, pos,
                         now_ms > sh->now_floor ? now_ms : sh->now_floor);
        if (replay_on && r->nsamples)
            seal_groups(store, r->shard, pe->block, r);
    }
    return rc;
}

/* The planless series of the batch's records from byte `from` in every shard of [lo, hi):
   the record there (shard `first`) first, so it is listed even if the list fills up, then one
   pass over the rest per window of up to 64 shards (each shard's ask round drawn once), each
   record's lookup under its shard's lock (m3_aggst_want may create the series). */
static void list_need(uint8_t *base, uint8_t *store, const uint8_t *batch, size_t len,
                      size_t from, uint32_t first, uint32_t lo, uint32_t hi,
                      uint32_t *need_shard, uint32_t *need, uint32_t *need_gen,
                      size_t need_cap, size_t *nneed)
{
    const seg_hdr *h = cseg_of(base);
    uint32_t rounds[64];
    for (uint32_t w = lo; w < hi && *nneed < need_cap; w += 64) {
        uint32_t end = hi - w > 64 ? w + 64 : hi;
        memset(rounds, 0, sizeof rounds);  /* 0: not drawn yet (a drawn round is never 0) */
        for (int pass = 0; pass < 2; pass++) {
            if (pass == 0 && (first < w || first >= end))
                continue;
            for (size_t o = from; o < len && *nneed < need_cap;) {
                const m3_rec *q = (const m3_rec *)(batch + o);
                if (m3_rec_check(q, len - o, h->p.num_shards))
                    break;
                o += q->len;
                if (q->shard < w || q->shard >= end ||
                    (q->type != M3_REC_SAMPLES && q->type != M3_REC_ROLLUP_IN))
                    continue;
                m3_shard_lock(base, q->shard);
                if (!rounds[q->shard - w])
                    rounds[q->shard - w] = m3_aggst_next_round(store, q->shard);
                if (m3_aggst_want(base, store, q, rounds[q->shard - w], &need[*nneed],
                                  &need_gen[*nneed]))
                    need_shard[(*nneed)++] = q->shard;
                m3_shard_unlock(base, q->shard);
                if (pass == 0)
                    break;  /* the record the apply stopped at (the first one from `from`) */
            }
        }
    }
}

int m3_shard_apply_batch_agg(uint8_t *base, uint8_t *store, const uint8_t *batch, size_t len,
                             uint64_t seq, uint32_t lo, uint32_t hi, int64_t now_ms,
                             size_t *off, uint32_t *need_shard, uint32_t *need,
                             uint32_t *need_gen, size_t need_cap, size_t *nneed)
{
    if (!base || !store || !off || !need_shard || !need || !need_gen || !nneed || !need_cap)
        return M3_EINVAL;
    const seg_hdr *h = cseg_of(base);
    *nneed = 0;
    int n = 0;
    while (*off < len) {
        if (*off % 8)
            return M3_ECORRUPT;
        const m3_rec *r = (const m3_rec *)(batch + *off);
        int rc = m3_rec_check(r, len - *off, h->p.num_shards);
        if (rc)
            return rc;
        if (r->shard >= lo && r->shard < hi) {
            m3_shard_lock(base, r->shard);
            rc = m3_aggst_apply_rec(base, store, r, seq, *off, now_ms);
            if (rc == M3_AGG_NEEDS_PLAN) {
                /* list every planless series of the rest of the batch in every shard of
                   [lo, hi), this shard's first, each shard under its own lock, then stop
                   here: Python plans them all in one go (the batch's series are spread over
                   every shard; stopping once per shard would cost a Python round each) */
                m3_shard_unlock(base, r->shard);
                list_need(base, store, batch, len, *off, r->shard, lo, hi, need_shard, need,
                          need_gen, need_cap, nneed);
                return n;
            }
            m3_shard_unlock(base, r->shard);
            n++;
        }
        *off += r->len;
    }
    return n;
}

/* ---- finalising -------------------------------------------------------------------------- */

/* Append one canonical label pair (u16 name_len, name, u16 value_len, value; both lengths
   below 256 here) at out[*o]; -1 if it does not fit in cap. */
static int put_label(uint8_t *out, size_t cap, size_t *o, const char *name, size_t nl,
                     const char *val, size_t vl)
{
    size_t p = *o;
    if (p + 4 + nl + vl > cap)
        return -1;
    out[p++] = (uint8_t)nl;
    out[p++] = 0;
    memcpy(out + p, name, nl);
    p += nl;
    out[p++] = (uint8_t)vl;
    out[p++] = 0;
    memcpy(out + p, val, vl);
    *o = p + vl;
    return 0;
}

/* Canonical labels of one output stream into out: the cell's fixed labels, or the series' own
   with m3_aggregation="<agg>" put in name order (replacing one the series has) when the cell
   keeps several aggregations. Returns the length, or -1 if it does not fit. */
static int64_t stream_labels(const shard_view *v, const plan_blk *b, const plan_cell *pc,
                             uint32_t agg, uint8_t *out, size_t cap)
{
    const uint8_t *src;
    uint32_t len;
    if (pc->labels_off) {
        src = (const uint8_t *)b + pc->labels_off;
        len = pc->labels_len;
    } else {
        if (!slot_live(v, b->slot, b->gen))
            return -2;  /* the series is gone: its rows have no name */
        const series_slot *s = &v->slots[b->slot];
        src = v->arena + s->labels_off;
        len = s->labels_len;
    }
    if (!(pc->flags & M3_AGGC_AGG_LABEL) || pc->labels_off) {
        if (len > cap)
            return -1;
        memcpy(out, src, len);
        return len;
    }
    static const char name[] = "m3_aggregation";
    const size_t nl = sizeof name - 1;
    const char *val = AGG_LOWER[agg < 22 ? agg : 0];
    size_t vl = strlen(val);
    size_t o = 0, i = 0;
    int placed = 0;
    while (i + 2 <= len) {
        size_t kl = (size_t)src[i] | (size_t)src[i + 1] << 8;
        if (i + 4 + kl > len)
            break;
        size_t xl = (size_t)src[i + 2 + kl] | (size_t)src[i + 3 + kl] << 8;
        size_t whole = 4 + kl + xl;
        if (i + whole > len)
            break;
        int cmp = memcmp(src + i + 2, name, kl < nl ? kl : nl);
        if (cmp == 0)
            cmp = kl < nl ? -1 : kl > nl ? 1 : 0;
        if (!placed && cmp >= 0) {
            if (put_label(out, cap, &o, name, nl, val, vl) != 0)
                return -1;
            placed = 1;
            if (cmp == 0) {  /* the series' own m3_aggregation label is replaced */
                i += whole;
                continue;
            }
        }
        if (o + whole > cap)
            return -1;
        memcpy(out + o, src + i, whole);
        o += whole;
        i += whole;
    }
    if (!placed && put_label(out, cap, &o, name, nl, val, vl) != 0)
        return -1;
    return (int64_t)o;
}

typedef struct outbuf {
    uint8_t *labels;
    size_t labels_cap;
    uint64_t *loffs;        /* streams_cap + 1 entries; loffs[0] = 0 */
    size_t streams_cap;
    size_t nstreams;
    m3_aggst_row *rows;
    size_t rows_cap;
    size_t nrows;
} outbuf;

/* Rows of one cell (tmp[0..n), oldest window first) as one stream per aggregation. Returns
   0, -1 when the output is full, -2 when the series is gone (rows dropped). */
static int put_rows(outbuf *o, const shard_view *v, const plan_blk *b, const plan_cell *pc,
                    const m3_agg_out *tmp, size_t n)
{
    uint32_t aggs = 0;
    for (size_t i = 0; i < n; i++)
        aggs |= 1u << tmp[i].agg;
    for (uint32_t m = aggs; m; m &= m - 1) {
        uint32_t agg = (uint32_t)__builtin_ctz(m);
        if (o->nstreams >= o->streams_cap)
            return -1;
        uint64_t at = o->loffs[o->nstreams];
        int64_t len = stream_labels(v, b, pc, agg, o->labels + at, o->labels_cap - at);
        if (len < 0)
            return (int)len;
        size_t cnt = 0;
        for (size_t i = 0; i < n; i++)
            cnt += tmp[i].agg == agg;
        if (o->rows_cap - o->nrows < cnt)
            return -1;
        for (size_t i = 0; i < n; i++) {
            if (tmp[i].agg != agg)
                continue;
            m3_aggst_row *r = &o->rows[o->nrows++];
            r->stream = (uint32_t)o->nstreams;
            r->ns = pc->ns_id;
            r->kind = pc->kind;
            r->agg = (uint8_t)agg;
            r->ts = tmp[i].ts;
            r->value = tmp[i].value;
        }
        o->loffs[o->nstreams + 1] = at + (uint64_t)len;
        o->nstreams++;
    }
    return 0;
}

static int cell_open(const m3_aggcell *c)
{
    return c->hi_widx != INT64_MIN && c->lo_widx <= c->hi_widx;
}

/* Rules activation over a rollup group: cell pc of plan b, a group cell (a changed rule's
   counter: kind OUTPUT under the group series' own labels, a lone Add post transform) whose
   total has no value yet, continues from the total of the same group series' cell of its
   resolution and aggregation in the plan b replaced (prev; one of the same rule first), so the
   rolled-up counter goes on across the change instead of restarting at zero. `into` is the
   cell to seed: c itself at commit and release, its scratch copy at prepare; both read the
   old cell as it is before this pass (b is finalised before its prevs, and no sample enters
   a window of the old cell once it is final), so prepare and commit emit the same values.
   The old total is known once every window of the old cell is final: no open window and
   now >= activation + its admission (its windows end at or before the activation). Until
   then returns 1: the cell must not finalise yet. An old cell that never had a value passes
   the question on to its own predecessor. 0 otherwise (seeded, nothing to seed, or no such
   cell before: the counter starts at zero). */
static int seed_post(uint8_t *store, uint32_t shard, plan_blk *b, const plan_cell *pc,
                     uint8_t *into, int64_t now)
{
    if (!b->prev || !pc->rule || pc->kind != M3_AGGK_OUTPUT || pc->labels_off ||
        (pc->flags & M3_AGGC_AGG_LABEL) || !m3_agg_post_fresh(into, pc->cell_bytes))
        return 0;
    const m3_aggcell *c = (const m3_aggcell *)into;
    plan_blk *succ = b;
    for (int depth = 0; succ->prev && depth < 64; depth++) {
        plan_blk *p = blk_at(store, shard, succ->prev);
        if (!p)
            return 0;
        const plan_cell *best = NULL;
        for (uint32_t k = 0; k < p->ncells; k++) {
            const plan_cell *q = &cells_of(p)[k];
            const m3_aggcell *o = cell_of(p, q);
            if (!q->rule || q->kind != M3_AGGK_OUTPUT || q->labels_off ||
                (q->flags & M3_AGGC_AGG_LABEL) || q->ns_id != pc->ns_id ||
                o->p.res_ms != c->p.res_ms || o->p.aggmask != c->p.aggmask ||
                memcmp(o->p.post, c->p.post, sizeof c->p.post))
                continue;
            if (!best || q->rule == pc->rule)
                best = q;
        }
        if (!best)
            return 0;
        m3_aggcell *o = cell_of(p, best);
        if (cell_open(o) || now < succ->from_ms + o->p.admission_ms)
            return 1;
        if (m3_agg_take_post(into, pc->cell_bytes, (const uint8_t *)o, best->cell_bytes) ||
            !m3_agg_post_fresh((const uint8_t *)o, best->cell_bytes))
            return 0;
        succ = p;
    }
    return 0;
}

/* Finalise one block's due cells at now: into out (prepare: on scratch copies) or for real
   (commit: rows counted, not written). Returns 0, or -1 when out is full (prepare). */
static int blk_finalise(uint8_t *store, uint32_t shard, const shard_view *v, plan_blk *b,
                        int64_t now, int commit, uint8_t *scratch, size_t scratch_cap,
                        outbuf *o, uint64_t *points, int64_t *min_due)
{
    m3_agg_out tmp[TMP_ROWS];
    for (uint32_t k = 0; k < b->ncells; k++) {
        plan_cell *pc = &cells_of(b)[k];
        m3_aggcell *c = cell_of(b, pc);
        if (c->due_ms > now) {
            if (min_due && c->due_ms < *min_due)
                *min_due = c->due_ms;
            continue;
        }
        uint8_t *cell = (uint8_t *)c;
        if (!commit) {
            if (pc->cell_bytes > scratch_cap)
                return -1;
            memcpy(scratch, c, pc->cell_bytes);
            cell = scratch;
        }
        if (seed_post(store, shard, b, pc, cell, now)) {
            /* a changed rule's group counter waits for its old total (one round at most
               when the old cell's last window is due with the new one's first) */
            if (min_due && c->due_ms < *min_due)
                *min_due = c->due_ms;
            continue;
        }
        uint32_t next = 0;
        int rc;
        do {
            size_t nout = 0;
            rc = m3_agg_finalise(cell, pc->cell_bytes, 1, 0, now, tmp, TMP_ROWS, &nout, &next);
            if (commit) {
                *points += nout;
            } else if (nout) {
                int pr = put_rows(o, v, b, pc, tmp, nout);
                if (pr == -1)
                    return -1;
            }
        } while (rc == M3_ENOSPC);
        if (min_due && c->due_ms < *min_due)
            *min_due = c->due_ms;
    }
    return 0;
}

/* A replaced plan (prev) leaves its successor's chain once every window it can hold is final
   and written: windows ending at or before from_ms (a boundary of every policy) are final at
   from_ms + admission, and none is open after this commit. Samples stamped at or before
   from_ms arriving later are late in the successor's cells (their windows are final there
   from the start), as they would have been in prev's. */
static void release_prev(uint8_t *store, uint32_t shard, plan_blk *b, int64_t now,
                         int64_t *min_due)
{
    for (int depth = 0; b && b->prev && depth < 64; depth++) {
        plan_blk *p = blk_at(store, shard, b->prev);
        if (!p) {
            b->prev = 0;  /* damaged: nothing more to route there */
            return;
        }
        int64_t at = b->from_ms + blk_max_admission(p);
        if (now >= at && !blk_open(p)) {
            /* every window of p is final: a group counter of b with no value yet takes its
               total now, before p (and the chain behind it) is freed */
            for (uint32_t k = 0; k < b->ncells; k++)
                (void)seed_post(store, shard, b, &cells_of(b)[k],
                                (uint8_t *)cell_of(b, &cells_of(b)[k]), now);
            /* Compiler-only ordering (owner-private words): the totals are in memory before
               the chain stops naming p. */
            __atomic_signal_fence(__ATOMIC_SEQ_CST);
            uint64_t off = b->prev;
            b->prev = 0;  /* the plan stops routing to it before it is freed */
            blk_retire(store, shard, off);
            return;
        }
        if (min_due && at < *min_due)
            *min_due = at;  /* a pass then, even if no cell is due: to free it */
        b = p;
    }
}

static int finalise_pass(uint8_t *seg, uint8_t *store, uint32_t shard, int64_t now_ms,
                         int commit, uint32_t first, uint32_t last, uint32_t *next,
                         uint32_t *spill_upto, uint8_t *scratch, size_t scratch_cap, outbuf *o)
{
    aggst_hdr *h = hdr_of(store);
    aggst_shard *sh = sh_of(store, shard);
    plan_entry *tab = table_of(store, shard);
    shard_view v = shard_view_of(seg, shard);
    uint64_t points = 0;
    int rc = M3_OK;
    if (!commit && now_ms > sh->now_floor)
        sh->now_floor = now_ms;
    if (!commit && first == 0 && now_ms < sh->min_due && !sh->spill_n && !sh->retiring) {
        /* nothing can be due: skip the table (the common case between window ends) */
        *spill_upto = 0;
        if (next)
            *next = UINT32_MAX;  /* nothing to commit */
        return M3_OK;
    }
    /* a commit over the whole table recomputes min_due from every cell it sees */
    int64_t min_due = INT64_MAX;
    int64_t *md = commit && first == 0 && last > h->slots ? &min_due : NULL;
    if (first == 0) {
        /* the spill: rows of windows evicted by the drain, all of them or none */
        spill_row *sp = spill_of(store, shard);
        uint32_t n = *spill_upto < sh->spill_n ? *spill_upto : sh->spill_n;
        if (!commit) {
            size_t ns0 = o->nstreams, nr0 = o->nrows;
            for (uint32_t i = 0; i < n; i++) {
                plan_blk *b = blk_at(store, shard, sp[i].block);
                if (!b || sp[i].cell >= b->ncells)
                    continue;
                m3_agg_out row = {sp[i].cell, sp[i].agg, sp[i].ts, sp[i].value};
                if (put_rows(o, &v, b, &cells_of(b)[sp[i].cell], &row, 1) == -1) {
                    o->nstreams = ns0;  /* they leave with a later round */
                    o->nrows = nr0;
                    n = 0;
                    break;
                }
            }
            *spill_upto = n;
        } else {
            memmove(sp, sp + n, (sh->spill_n - n) * sizeof(spill_row));
            sh->spill_n -= n;
            points += n;
        }
    }
    if (commit) {
        /* rows of this commit's windows that an eviction spilled after their prepare */
        spill_row *sp = spill_of(store, shard);
        uint32_t keep = 0;
        for (uint32_t j = 0; j < sh->spill_n; j++) {
            plan_blk *b = sp[j].prepared ? blk_at(store, shard, sp[j].block) : NULL;
            if (b && b->slot >= first && b->slot < last && sp[j].cell < b->ncells &&
                sp[j].ts + cell_of(b, &cells_of(b)[sp[j].cell])->p.admission_ms <= now_ms)
                continue;
            sp[keep++] = sp[j];
        }
        sh->spill_n = keep;
    }
    uint32_t i = first;
    for (; i < last && i <= h->slots; i++) {
        if (i == h->slots) {
            /* the retiring list, as one unit after the table */
            uint64_t *link = &sh->retiring;
            while (*link) {
                plan_blk *b = blk_at(store, shard, *link);
                if (!b) {
                    *link = 0;  /* a damaged link: cut the list (the rest leaks) */
                    break;
                }
                size_t ns0 = o ? o->nstreams : 0, nr0 = o ? o->nrows : 0;
                if (blk_finalise(store, shard, &v, b, now_ms, commit, scratch, scratch_cap, o,
                                 &points, md)) {
                    o->nstreams = ns0;
                    o->nrows = nr0;
                    rc = M3_ENOSPC;
                    break;
                }
                if (commit && !blk_open(b)) {
                    int named = 0;
                    for (uint32_t j = 0; j < sh->spill_n && !named; j++)
                        named = spill_of(store, shard)[j].block == *link;
                    if (!named) {
                        uint64_t off = *link;
                        *link = b->next;
                        blk_free(store, shard, off);
                        continue;
                    }
                }
                link = &b->next;
            }
            if (rc)
                break;
            continue;
        }
        plan_entry *pe = &tab[i];
        if (!(pe->flags & PE_RESOLVED) || !pe->block)
            continue;
        plan_blk *b = blk_at(store, shard, pe->block);
        if (!b)
            continue;
        size_t ns0 = o ? o->nstreams : 0, nr0 = o ? o->nrows : 0;
        int full = 0;
        plan_blk *x = b;
        for (int depth = 0; x && !full && depth < 64; depth++) {  /* the plan and its prevs */
            full = blk_finalise(store, shard, &v, x, now_ms, commit, scratch, scratch_cap, o,
                                &points, md);
            x = x->prev ? blk_at(store, shard, x->prev) : NULL;
        }
        if (full) {
            o->nstreams = ns0;  /* all of a slot or nothing: commit takes whole slots */
            o->nrows = nr0;
            rc = M3_ENOSPC;
            break;
        }
        if (commit)
            release_prev(store, shard, b, now_ms, md);
    }
    if (next)
        *next = i;
    if (md && rc == M3_OK)
        sh->min_due = min_due;  /* the drain only lowered it while we held the lock: none */
    add_stat(&sh->points, points);
    return rc;
}

int m3_aggst_prepare(uint8_t *seg, uint8_t *store, uint32_t shard, int64_t now_ms,
                     uint32_t first, uint32_t *next, uint32_t *spill_n, uint8_t *scratch,
                     size_t scratch_cap, uint8_t *labels, size_t labels_cap, uint64_t *loffs,
                     size_t streams_cap, size_t *nstreams, m3_aggst_row *rows, size_t rows_cap,
                     size_t *nrows)
{
    if (!seg || !store || shard >= hdr_of(store)->num_shards || !next || !spill_n ||
        !scratch || !labels || !loffs || !streams_cap || !nstreams || !rows || !nrows)
        return M3_EINVAL;
    outbuf o = {labels, labels_cap, loffs, streams_cap, 0, rows, rows_cap, 0};
    loffs[0] = 0;
    m3_shard_lock(seg, shard);
    *spill_n = sh_of(store, shard)->spill_n;
    if (first != 0)
        *spill_n = 0;
    int rc = finalise_pass(seg, store, shard, now_ms, 0, first, UINT32_MAX, next, spill_n,
                           scratch, scratch_cap, &o);
    sh_of(store, shard)->prep_next = *next == UINT32_MAX ? 0 : *next;
    m3_shard_unlock(seg, shard);
    *nstreams = o.nstreams;
    *nrows = o.nrows;
    if (rc == M3_ENOSPC && *next == first && o.nrows == 0)
        return M3_EINVAL;  /* not even one slot fits: the caller's buffers are too small */
    return rc;
}

int m3_aggst_commit(uint8_t *seg, uint8_t *store, uint32_t shard, int64_t now_ms,
                    uint32_t first, uint32_t last, uint32_t spill_n)
{
    if (!seg || !store || shard >= hdr_of(store)->num_shards)
        return M3_EINVAL;
    m3_shard_lock(seg, shard);
    int rc = finalise_pass(seg, store, shard, now_ms, 1, first, last, NULL, &spill_n, NULL, 0,
                           NULL);
    m3_shard_unlock(seg, shard);
    return rc;
}

void m3_aggst_set_rules_version(uint8_t *store, uint32_t shard, uint64_t version)
{
    if (store && shard < hdr_of(store)->num_shards)
        /* Relaxed: read back by the owner's next incarnation and as a statistic. */
        __atomic_store_n(&sh_of(store, shard)->rules_version, version, __ATOMIC_RELAXED);
}

/* ---- recovery and statistics ------------------------------------------------------------- */

int m3_aggst_recover(uint8_t *seg, uint8_t *store, uint32_t shard)
{
    if (!seg || !store || shard >= hdr_of(store)->num_shards)
        return M3_EINVAL;
    aggst_hdr *h = hdr_of(store);
    aggst_shard *sh = sh_of(store, shard);
    if (sh->bump < ARENA_FIRST || sh->bump > h->arena_bytes)
        sh->bump = h->arena_bytes;  /* nothing more is allocated from a damaged pointer */
    if (sh->spill_n > M3_AGGST_SPILL)
        sh->spill_n = 0;
    undo_restore(store, shard);
    sh->min_due = INT64_MIN;  /* a killed drain may have opened a window and not lowered it */
    if ((sh->free_head % 8) || sh->free_head >= h->arena_bytes)
        sh->free_head = 0;  /* free blocks are only reused through valid links */
    plan_entry *tab = table_of(store, shard);
    int dropped = 0;
    for (uint32_t i = 0; i < h->slots; i++) {
        plan_entry *pe = &tab[i];
        if (!pe->block)
            continue;
        plan_blk *b = blk_at(store, shard, pe->block);
        int ok = b != NULL;
        for (uint32_t k = 0; ok && k < b->ncells; k++) {
            plan_cell *pc = &cells_of(b)[k];
            ok = (uint64_t)pc->cell_off + pc->cell_bytes <= b->bytes && pc->cell_off % 8 == 0 &&
                 m3_agg_cell_check((uint8_t *)b + pc->cell_off, pc->cell_bytes) == M3_OK;
        }
        if (!ok) {
            pe->flags = 0;
            pe->block = 0;  /* asked for again; the block leaks */
            dropped++;
            continue;
        }
        /* the plans it replaced: a damaged one is cut off (its windows are lost, it leaks) */
        for (int depth = 0; b->prev && depth < 64; depth++) {
            plan_blk *p = blk_at(store, shard, b->prev);
            int pok = p != NULL;
            for (uint32_t k = 0; pok && k < p->ncells; k++) {
                plan_cell *pc = &cells_of(p)[k];
                pok = (uint64_t)pc->cell_off + pc->cell_bytes <= p->bytes &&
                      pc->cell_off % 8 == 0 &&
                      m3_agg_cell_check((uint8_t *)p + pc->cell_off, pc->cell_bytes) == M3_OK;
            }
            if (!pok) {
                b->prev = 0;
                break;
            }
            b = p;
        }
    }
    uint64_t *link = &sh->retiring;
    while (*link) {
        plan_blk *b = blk_at(store, shard, *link);
        if (!b) {
            *link = 0;
            break;
        }
        for (uint32_t k = 0; k < b->ncells; k++) {
            plan_cell *pc = &cells_of(b)[k];
            if ((uint64_t)pc->cell_off + pc->cell_bytes > b->bytes ||
                m3_agg_cell_check((uint8_t *)b + pc->cell_off, pc->cell_bytes) != M3_OK) {
                *link = 0;
                break;
            }
        }
        if (*link)
            link = &b->next;
    }
    return dropped;
}

void m3_aggst_stats_get(const uint8_t *store, uint32_t shard, m3_aggst_stats *out)
{
    memset(out, 0, sizeof *out);
    if (!store || shard >= ((const aggst_hdr *)store)->num_shards)
        return;
    aggst_shard *sh = sh_of((uint8_t *)store, shard);
    /* Relaxed: statistics written by the owner with relaxed stores. */
    out->plans = __atomic_load_n(&sh->plans, __ATOMIC_RELAXED);
    out->cells = __atomic_load_n(&sh->cells, __ATOMIC_RELAXED);
    out->cell_bytes = __atomic_load_n(&sh->cell_bytes, __ATOMIC_RELAXED);
    out->arena_used = __atomic_load_n(&sh->bump, __ATOMIC_RELAXED);
    out->arena_bytes = ((const aggst_hdr *)store)->arena_bytes;
    out->applied = __atomic_load_n(&sh->applied, __ATOMIC_RELAXED);
    out->late = __atomic_load_n(&sh->late, __ATOMIC_RELAXED);
    out->evicted = __atomic_load_n(&sh->evicted, __ATOMIC_RELAXED);
    out->ooo = __atomic_load_n(&sh->ooo, __ATOMIC_RELAXED);
    out->points = __atomic_load_n(&sh->points, __ATOMIC_RELAXED);
    out->refused = __atomic_load_n(&sh->refused, __ATOMIC_RELAXED);
    out->spill_lost = __atomic_load_n(&sh->spill_lost, __ATOMIC_RELAXED);
    out->raw_dropped = __atomic_load_n(&sh->raw_dropped, __ATOMIC_RELAXED);
    out->asked = __atomic_load_n(&sh->asked, __ATOMIC_RELAXED);
    out->spill_n = __atomic_load_n(&sh->spill_n, __ATOMIC_RELAXED);
    out->rules_version = __atomic_load_n(&sh->rules_version, __ATOMIC_RELAXED);
    out->rollup_applied = __atomic_load_n(&sh->rollup_applied, __ATOMIC_RELAXED);
    out->rollup_dup = __atomic_load_n(&sh->rollup_dup, __ATOMIC_RELAXED);
    out->rollup_unmatched = __atomic_load_n(&sh->rollup_unmatched, __ATOMIC_RELAXED);
    out->now_floor = __atomic_load_n(&sh->now_floor, __ATOMIC_RELAXED);
    out->fwd_refused = __atomic_load_n(&sh->fwd_refused, __ATOMIC_RELAXED);
}

void m3_aggst_count_refused(uint8_t *store, uint32_t shard, uint64_t refused)
{
    if (!store || shard >= hdr_of(store)->num_shards)
        return;
    add_stat(&sh_of(store, shard)->fwd_refused, refused);
}

int m3_shard_apply_batch_agg_cells(uint8_t *base, uint8_t *store, const uint8_t *batch,
                                   size_t len, uint64_t seq, uint32_t lo, uint32_t hi,
                                   int64_t now_ms, size_t *off, uint32_t *need_shard,
                                   uint32_t *need, uint32_t *need_gen, size_t need_cap,
                                   size_t *nneed)
{
    cells_only = 1;
    int rc = m3_shard_apply_batch_agg(base, store, batch, len, seq, lo, hi, now_ms, off,
                                      need_shard, need, need_gen, need_cap, nneed);
    cells_only = 0;
    return rc;
}
