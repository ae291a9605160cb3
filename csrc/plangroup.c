/*
 * plangroup.c -- group series by the labels a rule set reads, so a plan is made once per group
 * (docs/rules.md "Planning new series", docs/formats/aggstore.md "Planning in batches").
 *
 * A series' plan (which cells it feeds) depends only on the values of the labels the rule
 * set's filters and rollups name: its *projection*. m3_series_group takes a batch of series
 * (shard, slot, gen) and a projection, and gives every live series a group number such
 * that two series share a group exactly when their projected label bytes are equal; Python
 * then matches the rules once per group, on one representative, and installs the plan for the
 * whole group with one call (m3_aggst_install_many).
 *
 * Projection of a series' canonical labels (repeated u16 name_len, name, u16 value_len,
 * value, sorted by name): walk its pairs in order; a pair whose name is one of `names` is
 * kept whole (name and value); any other pair is dropped (M3_PROJ_SKIP), kept as its name
 * only (M3_PROJ_NAMES: the plan depends on which labels exist, not their values), or kept
 * whole (M3_PROJ_ALL: the plan may depend on every label, e.g. a rollup with excludeBy).
 * A kept pair is written as (u16 name_len, name, u16 value_len or 0xFFFF for "name only",
 * value): so an absent label, an empty value and a name-only entry never encode alike, and
 * the bytes of two series are equal iff their projections are.
 *
 * Algorithm: one pass; each series' projected bytes are written at the end of the scratch
 * buffer's byte area and hashed (m3_labels_hash); an open-addressing table (power of two,
 * at least twice the batch, linear probing) maps the hash to the groups seen so far, and a
 * group is joined only after its representative's bytes compare equal (no collision can merge
 * two projections). A new group keeps its bytes; otherwise the area is rewound. Scratch
 * layout: table (u32 × tsize, 0 = empty, else group + 1) | per group hash u64, offset u64,
 * length u32 | bytes. The caller passes `scratch_cap` bytes; M3_ENOSPC if that is too small
 * (nothing useful written; retry bigger: m3_series_group_scratch gives a size that always
 * fits a batch whose labels total at most `label_bytes`).
 *
 * Reads only: series labels of live slots (the caller holds a read section, or is the shard's
 * owner, so no slot is reused under it). Writes only the caller's buffers.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "seg_int.h"

static uint64_t pow2_at_least(uint64_t n)
{
    uint64_t t = 16;
    while (t < n)
        t <<= 1;
    return t;
}

static uint64_t table_bytes(size_t n) { return round8(pow2_at_least(2 * (uint64_t)n) * 4); }

uint64_t m3_series_group_scratch(size_t n, uint64_t label_bytes)
{
    /* a projected pair is never longer than the pair it comes from */
    return table_bytes(n) + (uint64_t)n * 20 + label_bytes;
}

/* Is name (nl bytes) among names? (a handful of names: a linear scan) */
static int named(const uint8_t *name, uint32_t nl, const uint8_t *names, const uint64_t *noffs,
                 uint32_t nnames)
{
    for (uint32_t k = 0; k < nnames; k++)
        if (noffs[k + 1] - noffs[k] == nl && !memcmp(names + noffs[k], name, nl))
            return 1;
    return 0;
}

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline void wr16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

/* Write the projection of labels[0..len) at out (room for cap bytes): bytes written, or -1
   if they do not fit or the labels are malformed. */
static int64_t project(const uint8_t *lab, uint32_t len, const uint8_t *names,
                       const uint64_t *noffs, uint32_t nnames, uint32_t others, uint8_t *out,
                       uint64_t cap)
{
    uint64_t o = 0;
    for (uint32_t i = 0; i < len;) {
        if (len - i < 2)
            return -1;
        uint32_t nl = rd16(lab + i);
        if (len - i - 2 < nl + 2u)
            return -1;
        const uint8_t *name = lab + i + 2;
        uint32_t vl = rd16(lab + i + 2 + nl);
        if (len - i - 4 - nl < vl)
            return -1;
        const uint8_t *val = name + nl + 2;
        i += 4 + nl + vl;
        int whole = others == M3_PROJ_ALL || named(name, nl, names, noffs, nnames);
        if (!whole && others == M3_PROJ_SKIP)
            continue;
        uint64_t need = 4 + (uint64_t)nl + (whole ? vl : 0);
        if (cap - o < need)
            return -1;
        wr16(out + o, nl);
        memcpy(out + o + 2, name, nl);
        wr16(out + o + 2 + nl, whole ? vl : 0xFFFFu);
        if (whole)
            memcpy(out + o + 4 + nl, val, vl);
        o += need;
    }
    return (int64_t)o;
}

int m3_series_group(const uint8_t *base, const uint32_t *shards, const uint32_t *slots,
                    const uint32_t *gens, size_t n, const uint8_t *names, const uint64_t *noffs,
                    uint32_t nnames, uint32_t others, uint32_t *group, uint32_t *reps,
                    size_t *ngroups, uint8_t *scratch, size_t scratch_cap)
{
    if (!base || (n && (!shards || !slots || !gens || !group || !reps)) || !ngroups ||
        !scratch || (nnames && (!names || !noffs)) || others > M3_PROJ_ALL || n >= UINT32_MAX)
        return M3_EINVAL;
    for (size_t i = 0; i < n; i++)
        if (shards[i] >= cseg_of(base)->p.num_shards)
            return M3_EINVAL;
    *ngroups = 0;
    uint64_t tsize = pow2_at_least(2 * (uint64_t)n);
    uint64_t fixed = table_bytes(n) + (uint64_t)n * 20;
    if (scratch_cap < fixed)
        return M3_ENOSPC;
    uint32_t *table = (uint32_t *)scratch;
    memset(table, 0, tsize * 4);
    uint8_t *gmeta = scratch + table_bytes(n);   /* per group: hash, offset, length */
    uint8_t *area = gmeta + (uint64_t)n * 20;
    uint64_t acap = scratch_cap - fixed, used = 0;
    size_t ng = 0;
    for (size_t i = 0; i < n; i++) {
        group[i] = UINT32_MAX;
        shard_view v = shard_view_of(base, shards[i]);
        /* Acquire: pairs with the owner's release of the slot high-water mark */
        uint32_t live_n = __atomic_load_n(&v.sh->nseries, __ATOMIC_ACQUIRE);
        uint32_t s = slots[i];
        if (s >= v.h->slot_cap || s >= live_n)
            continue;
        const series_slot *ss = &v.slots[s];
        /* Acquire: pairs with the owner's release store of SLOT_LIVE (the labels and gen
           are written before it) */
        if (__atomic_load_n(&ss->state, __ATOMIC_ACQUIRE) != SLOT_LIVE || ss->gen != gens[i])
            continue;
        int64_t pl = project(v.arena + ss->labels_off, ss->labels_len, names, noffs, nnames,
                             others, area + used, acap - used);
        if (pl < 0)
            return ss->labels_len > acap - used ? M3_ENOSPC : M3_ECORRUPT;
        const uint8_t *pb = area + used;
        uint64_t h = m3_labels_hash(pb, (size_t)pl);
        uint64_t at = h & (tsize - 1);
        for (;;) {
            uint32_t e = table[at];
            if (!e) {
                /* a new group: it keeps its bytes */
                uint8_t *m = gmeta + (uint64_t)ng * 20;
                uint32_t l32 = (uint32_t)pl;
                memcpy(m, &h, 8);
                memcpy(m + 8, &used, 8);
                memcpy(m + 16, &l32, 4);
                table[at] = (uint32_t)ng + 1;
                reps[ng] = (uint32_t)i;
                group[i] = (uint32_t)ng++;
                used += (uint64_t)pl;
                break;
            }
            const uint8_t *m = gmeta + (uint64_t)(e - 1) * 20;
            uint64_t gh, goff;
            uint32_t gl;
            memcpy(&gh, m, 8);
            memcpy(&goff, m + 8, 8);
            memcpy(&gl, m + 16, 4);
            if (gh == h && gl == (uint64_t)pl && !memcmp(area + goff, pb, gl)) {
                group[i] = e - 1;  /* the area is not advanced: these bytes are dropped */
                break;
            }
            at = (at + 1) & (tsize - 1);
        }
    }
    *ngroups = ng;
    return M3_OK;
}
