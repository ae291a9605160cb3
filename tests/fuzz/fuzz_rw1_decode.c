/*
 * libFuzzer target for the remote write 1.0 decoder (csrc/rw_decode.c): arbitrary bytes stand
 * for a snappy-decompressed WriteRequest. The decoder must return records or an error, never
 * crash or read out of bounds (ASan+UBSan watch). Every record it produces must pass the lane
 * record check, carry the hash of its canonical labels and the shard that hash picks, and
 * apply cleanly to a small shared-memory segment (series.c), whose samples must then read back.
 * Metadata rows must point inside the input. A small `known` set exercises the lookup.
 * Inputs are capped at 64 KiB (-max_len in tests/fuzz/run.sh).
 *
 * fuzz-sources: csrc/rw_decode.c csrc/rw_series.c csrc/series.c csrc/lane.c csrc/segment.c csrc/codec.c csrc/arena.c csrc/epoch.c csrc/block.c csrc/aggstore.c csrc/aggwin.c csrc/rollup.c
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>


#include "seg_int.h" /* includes m3shm.h */

static uint8_t *seg;
static uint64_t seg_size;

static void setup(void)
{
    m3_seg_params p = {0};
    p.num_shards = 4;
    p.num_producers = 1;
    p.lane_bytes = 1 << 16;
    p.series_per_shard = 64;
    p.arena_bytes = 1 << 18;
    p.block_ms = 7200000;
    seg_size = m3_seg_size(&p);
    seg = calloc(1, seg_size);
    if (!seg || m3_seg_init(seg, seg_size, &p))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!seg)
        setup();
    m3_rw_limits lim = {INT64_MIN / 2, INT64_MAX / 2, 4, 16, 64, 256, 1000};
    m3_rw_result res;
    static uint64_t known[8] = {2, 0, 0, 1, 0, 0, 0, 0};
    m3_rw_meta meta[16];
    size_t cap = 2 * size + 256;
    uint8_t *out = malloc(cap);
    m3_rw_out o = {out, cap, meta, 16, known, 8, NULL, 0};
    int rc = m3_rw1_decode(data, size, &lim, &o, &res);
    if (rc == M3_ENOSPC) {
        free(out);
        cap = 40 * size + 4096;
        out = malloc(cap);
        o.records = out, o.records_cap = cap;
        rc = m3_rw1_decode(data, size, &lim, &o, &res);
        if (rc == M3_ENOSPC && res.nmeta <= 16)
            abort(); /* records room was ample: only the metadata may overflow */
    }
    if (rc == M3_ENOSPC) {
        free(out);
        return 0;
    }
    if (rc == M3_OK) {
        for (uint64_t i = 0; i < res.nmeta; i++) {
            const m3_rw_meta *m = &meta[i];
            if (m->name_off + m->name_len > size || m->help_off + m->help_len > size ||
                m->unit_off + m->unit_len > size || m->hash < 2 || m->type > 7)
                abort();
        }
    }
    if (rc == M3_OK) {
        if (res.out_len > cap)
            abort();
        size_t off = 0;
        while (off < res.out_len) {
            const m3_rec *r = (const m3_rec *)(out + off);
            if (m3_rec_check(r, res.out_len - off, 4))
                abort();
            if (m3_labels_hash((const uint8_t *)(r + 1), r->labels_len) != r->hash ||
                r->hash % 4 != r->shard)
                abort();
            off += r->len;
        }
        /* apply into a fresh segment every time the arena gets crowded */
        m3_shard_stats st;
        m3_shard_stats_get(seg, 0, &st);
        if (st.arena_used > (1 << 17) || st.nseries > 16) {
            memset(seg, 0, seg_size);
            free(seg);
            seg = NULL;
            setup();
        }
        if (m3_shard_apply_batch(seg, out, res.out_len, 1, 0, 4) < 0)
            abort();
        for (uint32_t s = 0; s < 4; s++) {
            uint32_t n = m3_shard_nseries(seg, s);
            for (uint32_t i = 0; i < n && i < 4; i++) {
                uint64_t c = m3_series_count(seg, s, i);
                int64_t *ts = malloc((c + 1) * 8);
                double *v = malloc((c + 1) * 8);
                size_t got;
                if (m3_series_read(seg, s, i, INT64_MIN, INT64_MAX, ts, v, c + 1, &got))
                    abort();
                free(ts);
                free(v);
            }
        }
    } else if (rc != M3_ECORRUPT && rc != M3_ETRUNC) {
        abort();
    }
    free(out);
    return 0;
}
