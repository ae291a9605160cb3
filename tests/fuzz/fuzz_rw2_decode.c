/*
 * libFuzzer target for the remote write 2.0 decoder (csrc/rw2_decode.c, csrc/rw_series.c):
 * arbitrary bytes stand for a snappy-decompressed io.prometheus.write.v2.Request. The decoder
 * must return records or an error, never crash or read out of bounds (ASan+UBSan watch); it may
 * ask for more room (M3_ENOSPC) only by a bounded number of doublings, and a too-small symbol
 * scratch must be reported with the exact count. Every record must pass the lane record check
 * and carry the hash of its canonical labels and the shard that hash picks, and the batch must
 * apply cleanly to a small shared-memory segment. Metadata rows must point inside the input.
 * Inputs are capped at 64 KiB (-max_len in tests/fuzz/run.sh).
 *
 * fuzz-sources: csrc/rw2_decode.c csrc/rw_series.c csrc/series.c csrc/lane.c csrc/segment.c csrc/codec.c csrc/arena.c csrc/epoch.c csrc/block.c csrc/aggstore.c csrc/aggwin.c csrc/rollup.c
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
    size_t cap = 2 * size + 256, mcap = 4, scap = 4;
    uint8_t *out = malloc(cap);
    m3_rw_meta *meta = malloc(mcap * sizeof *meta);
    uint64_t *syms = malloc(scap * 16);
    int rc = M3_ENOSPC;
    for (int tries = 0; tries < 40 && rc == M3_ENOSPC; tries++) {
        m3_rw_out o = {out, cap, meta, mcap, known, 8, syms, scap};
        rc = m3_rw2_decode(data, size, &lim, &o, &res);
        if (rc != M3_ENOSPC)
            break;
        if (res.nsymbols > scap) {
            if (res.nsymbols > size) /* every symbol takes at least a tag and a length */
                abort();
            scap = res.nsymbols;
            syms = realloc(syms, scap * 16);
        } else if (res.nmeta > mcap) {
            mcap = res.nmeta;
            meta = realloc(meta, mcap * sizeof *meta);
        } else {
            cap *= 2;
            out = realloc(out, cap);
        }
        if (!out || !meta || !syms)
            abort();
    }
    if (rc == M3_OK) {
        if (res.out_len > cap || res.nmeta > mcap)
            abort();
        for (uint64_t i = 0; i < res.nmeta; i++) {
            const m3_rw_meta *m = &meta[i];
            if (m->name_off + m->name_len > size || m->help_off + m->help_len > size ||
                m->unit_off + m->unit_len > size || m->hash < 2 || m->type > 7)
                abort();
        }
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
        m3_shard_stats st;
        m3_shard_stats_get(seg, 0, &st);
        if (st.arena_used > (1 << 17) || st.nseries > 16) {
            free(seg);
            setup();
        }
        if (m3_shard_apply_batch(seg, out, res.out_len, 1, 0, 4) < 0)
            abort();
    } else if (rc != M3_ECORRUPT && rc != M3_ETRUNC && rc != M3_ENOSPC) {
        abort();
    }
    free(out);
    free(meta);
    free(syms);
    return 0;
}
