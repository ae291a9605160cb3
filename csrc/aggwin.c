/*
 * aggwin.c -- aggregation windows and transforms: the C half of downsampling and rollups.
 *
 * A cell (m3_aggcell, docs/formats/aggwin.md) holds everything one (series or rollup group,
 * storage policy, rule) needs to turn raw samples into one aggregated point per window:
 *
 *   header | nwin windows (m3_aggwin, a ring indexed by widx mod nwin) | nwin sketches (opt.)
 *
 * Windows. Window widx covers (widx*res, (widx+1)*res] and its point is stamped at its end,
 * (widx+1)*res: a Last-downsampled series then has, at every window end T, the last raw value
 * at or before T, so rate()/increase() over it agree with the raw data at window boundaries.
 * A window is final once end + admission <= now (Monarch's admission window); a sample for a
 * final window is counted in `late` and not applied. `done_widx` records that every window at
 * or below it is final, so lateness is one comparison. The ring holds nwin windows; a sample
 * whose window would overwrite an open older one first finalises (early, counted in `evicted`)
 * every open window at or below widx - nwin, oldest first, and raises done_widx to it.
 *
 * Aggregations over a window, all in O(1) per sample and fixed memory: Last (the value with
 * the largest timestamp; on ties the later-applied one), Min, Max, Count, Sum and Mean
 * (Neumaier-compensated sum, Mean = Sum / Count), SumSq, Stdev (sample standard deviation,
 * n - 1, from Welford's running mean and M2, 0 for one sample), and Median and P10 .. P9999
 * from a quantile sketch (below). NaN values (and Prometheus stale markers, which are NaNs)
 * are skipped and counted in `invalid`, as are timestamps beyond +-2^62 ms.
 *
 * Transforms. `pre` ops run per sample before the window, with per-series state: Increase
 * (v - prev; a drop means the counter restarted at 0, so the increase is v), PerSecond (the
 * increase divided by the seconds since the previous sample), Add (running sum), Absolute.
 * Increase and PerSecond emit nothing for a series' first sample (no previous value). A chain
 * with Increase, PerSecond or Add skips samples not after the previous one (`ooo`). A cell
 * whose pre chain ends in PerSecond is a rate cell: it sums increments per window and its Sum
 * is divided by the window's span (last sample ts - the ts before its first increment), so the
 * rate is exact even across counter resets inside a window. `post` ops run per finalised
 * window on the single aggregate the cell emits (Increase, PerSecond and Absolute as above,
 * between consecutive windows; Add re-accumulates a rolled-up sum of increments into a
 * counter). Transform state lives in the cell, so it survives a worker restart with it.
 *
 * Sketch. A log-bucketed relative-error sketch (the DDSketch idea): with alpha = 2% and
 * gamma = (1 + alpha) / (1 - alpha), a value x > 0 goes to bucket i = ceil(log_gamma(x)),
 * covering (gamma^(i-1), gamma^i], whose representative 2 gamma^i / (gamma + 1) is within
 * alpha of every value in it; negatives likewise by |x|, zeros are counted apart. A window
 * keeps 256 contiguous positive buckets and 64 negative ones, so memory is fixed; when values
 * span more than gamma^255 (~27,000x) the buckets of the smallest magnitudes are merged into
 * the lowest kept one. The estimate of quantile q is the representative of the bucket holding
 * the sample of rank ceil(q n), clamped to the window's [min, max]; it is within alpha
 * (relative) of that sample whenever the sample's bucket was not merged, which holds for every
 * quantile whose value is at least max / gamma^255 (upper quantiles are always kept).
 *
 * Invariants: windows of a cell are finalised in increasing widx order (post transforms rely
 * on it); an open window's widx is > done_widx; due_ms <= end + admission of every open
 * window. Single writer per cell (the shard owner); readers never look inside an open cell, so
 * no fences are needed here: finalised points leave through the out array and the caller's
 * commit log. After a crash a cell may hold a half-applied sample (the record is then applied
 * again only if its seq is above last_seq); m3_agg_cell_check repairs structural damage.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <math.h>

#include "m3shm.h"
#include "m3_int.h"

#define CELL_MAGIC 0x43574741u  /* "AGWC" little-endian */
#define FLAG_SKETCH 1u
#define FLAG_RATE 2u
#define WIDX_NONE INT64_MIN
#define TS_LIMIT (INT64_C(1) << 62)
#define RES_LIMIT (INT64_C(1) << 40)
#define ALL_AGGS 0x3FFFFFu

#define SK_ALPHA 0.02

_Static_assert(sizeof(m3_aggwin) % 8 == 0, "windows are 8-byte aligned");
_Static_assert(sizeof(m3_sketch) % 8 == 0, "sketches are 8-byte aligned");
_Static_assert(sizeof(m3_aggcell) % 8 == 0, "cells are 8-byte aligned");

/* ---- sketch ------------------------------------------------------------------------------ */

static double sk_gamma(void) { return (1.0 + SK_ALPHA) / (1.0 - SK_ALPHA); }

double m3_sketch_alpha(void) { return SK_ALPHA; }

static int32_t sk_index(double mag)
{
    /* mag > 0 (possibly subnormal or +Inf): clamp in the double domain before converting */
    double x = ceil(log(mag) / log(sk_gamma()));
    if (x > 1e9) x = 1e9;
    if (x < -1e9) x = -1e9;
    return (int32_t)x;
}

static double sk_value(int64_t i)
{
    double g = sk_gamma();
    return 2.0 * pow(g, (double)i) / (g + 1.0);
}

/* Put one count for index i into a store of nb buckets starting at *lo (c[0] holds *lo;
   *lo == INT32_MIN while the store is empty). */
static void sk_store_add(uint32_t *c, int32_t *lo, uint32_t nb, int32_t i)
{
    if (*lo == INT32_MIN) {
        memset(c, 0, nb * sizeof(uint32_t));
        *lo = i - (int32_t)(nb / 2);
        c[nb / 2] += 1;
        return;
    }
    int64_t top = (int64_t)*lo + nb - 1;
    if (i > top) {
        /* shift down: the buckets below the new lowest one merge into it */
        int64_t shift = (int64_t)i - top;
        uint32_t merged = 0;
        for (uint32_t k = 0; k < nb && (int64_t)k <= shift; k++) merged += c[k];
        if (shift < nb) {
            memmove(c, c + shift, (nb - (uint32_t)shift) * sizeof(uint32_t));
            memset(c + nb - shift, 0, (uint32_t)shift * sizeof(uint32_t));
        } else {
            memset(c, 0, nb * sizeof(uint32_t));
        }
        c[0] = merged;
        *lo = (int32_t)((int64_t)*lo + shift);
        c[i - *lo] += 1;
        return;
    }
    if (i < *lo) {
        /* shift up as far as the highest used bucket allows; what still does not fit merges
           into the lowest bucket */
        int64_t hi = 0;
        for (int64_t k = nb - 1; k >= 0; k--) {
            if (c[k]) { hi = k; break; }
        }
        int64_t room = (int64_t)nb - 1 - hi;
        int64_t want = (int64_t)*lo - i;
        int64_t shift = want < room ? want : room;
        if (shift > 0) {
            memmove(c + shift, c, (nb - (uint32_t)shift) * sizeof(uint32_t));
            memset(c, 0, (uint32_t)shift * sizeof(uint32_t));
            *lo = (int32_t)((int64_t)*lo - shift);
        }
        c[i < *lo ? 0 : i - *lo] += 1;
        return;
    }
    c[i - *lo] += 1;
}

static uint64_t sk_sum(const uint32_t *c, uint32_t nb)
{
    uint64_t s = 0;
    for (uint32_t k = 0; k < nb; k++) s += c[k];
    return s;
}

void m3_sketch_init(m3_sketch *s)
{
    memset(s, 0, sizeof(*s));
    s->pos_lo = INT32_MIN;
    s->neg_lo = INT32_MIN;
}

void m3_sketch_add(m3_sketch *s, double v)
{
    if (v > 0) sk_store_add(s->pos, &s->pos_lo, M3_SKETCH_POS, sk_index(v));
    else if (v < 0) sk_store_add(s->neg, &s->neg_lo, M3_SKETCH_NEG, sk_index(-v));
    else if (v == 0) s->zero++;
}

double m3_sketch_quantile(const m3_sketch *s, double q, double lo, double hi)
{
    uint64_t npos = sk_sum(s->pos, M3_SKETCH_POS), nneg = sk_sum(s->neg, M3_SKETCH_NEG);
    uint64_t n = npos + nneg + s->zero;
    if (n == 0 || !(q > 0) || q > 1) return NAN;
    /* rank of the wanted sample, 1-based: ceil(q n), at least 1 */
    double rd = ceil(q * (double)n - 1e-9);
    uint64_t rank = rd < 1 ? 1 : (uint64_t)rd;
    if (rank > n) rank = n;
    double est;
    uint64_t seen = 0;
    /* negatives, most negative first: highest magnitude bucket first */
    for (int32_t k = M3_SKETCH_NEG - 1; k >= 0 && nneg; k--) {
        seen += s->neg[k];
        if (seen >= rank) { est = -sk_value((int64_t)s->neg_lo + k); goto done; }
    }
    seen += s->zero;
    if (seen >= rank) { est = 0.0; goto done; }
    for (int32_t k = 0; k < M3_SKETCH_POS; k++) {
        seen += s->pos[k];
        if (seen >= rank) { est = sk_value((int64_t)s->pos_lo + k); goto done; }
    }
    return NAN; /* unreachable: counts add up to n */
done:
    if (est < lo) est = lo;
    if (est > hi) est = hi;
    return est;
}

/* ---- cell layout ------------------------------------------------------------------------- */

static int popcount32(uint32_t x) { return __builtin_popcount(x); }

static int op_valid(uint8_t op) { return op <= M3_XF_ABSOLUTE; }

static int chain_len(const uint8_t *ops)
{
    int k = 0;
    while (k < M3_AGG_MAX_OPS && ops[k] != M3_XF_NONE) k++;
    return k;
}

const char *m3_agg_params_check(const m3_agg_params *p)
{
    if (!p) return "no parameters";
    if (p->res_ms <= 0 || p->res_ms > RES_LIMIT) return "resolution must be 1 ms .. 2^40 ms";
    if (p->admission_ms < 0 || p->admission_ms > TS_LIMIT / 2)
        return "admission must be 0 .. 2^61 ms";
    if (p->nwin < 1 || p->nwin > M3_AGG_MAX_WINDOWS) return "nwin must be 1 .. 64";
    if (p->aggmask == 0 || (p->aggmask & ~ALL_AGGS)) return "aggregation mask is empty or unknown";
    int npre = chain_len(p->pre), npost = chain_len(p->post);
    for (int k = 0; k < M3_AGG_MAX_OPS; k++) {
        if (!op_valid(p->pre[k]) || !op_valid(p->post[k])) return "unknown transform";
        if ((k >= npre && p->pre[k]) || (k >= npost && p->post[k]))
            return "a transform chain has a gap (ops after a 0)";
    }
    for (int k = 0; k < npre - 1; k++) {
        if (p->pre[k] == M3_XF_PERSECOND) return "PerSecond before the window must be the last";
    }
    if (npre && p->pre[npre - 1] == M3_XF_PERSECOND && p->aggmask != (1u << M3_AGG_SUM))
        return "a PerSecond cell aggregates Sum only";
    if (npost && popcount32(p->aggmask) != 1)
        return "transforms after the window need exactly one aggregation";
    return 0;
}

static uint64_t win_bytes(uint32_t flags)
{
    return sizeof(m3_aggwin) + ((flags & FLAG_SKETCH) ? sizeof(m3_sketch) : 0);
}

static uint32_t flags_for(const m3_agg_params *p)
{
    uint32_t f = 0;
    int npre = chain_len(p->pre);
    if (p->aggmask & M3_AGG_SKETCH_MASK) f |= FLAG_SKETCH;
    if (npre && p->pre[npre - 1] == M3_XF_PERSECOND) f |= FLAG_RATE;
    return f;
}

uint64_t m3_agg_cell_bytes(const m3_agg_params *p)
{
    if (m3_agg_params_check(p)) return 0;
    return sizeof(m3_aggcell) + (uint64_t)p->nwin * win_bytes(flags_for(p));
}

static m3_aggwin *cell_win(m3_aggcell *c, uint32_t slot)
{
    return (m3_aggwin *)((uint8_t *)c + sizeof(m3_aggcell)) + slot;
}

static m3_sketch *cell_sketch(m3_aggcell *c, uint32_t slot)
{
    uint8_t *w0 = (uint8_t *)c + sizeof(m3_aggcell) + (uint64_t)c->p.nwin * sizeof(m3_aggwin);
    return (m3_sketch *)w0 + slot;
}

static void set_due(m3_aggcell *c)
{
    c->due_ms = c->lo_widx > c->hi_widx ? INT64_MAX
                                        : (c->lo_widx + 1) * c->p.res_ms + c->p.admission_ms;
}

int m3_agg_cell_init(uint8_t *cell, uint64_t cap, const m3_agg_params *p)
{
    uint64_t need = m3_agg_cell_bytes(p);
    if (!cell || need == 0 || cap < need || ((uintptr_t)cell & 7)) return M3_EINVAL;
    memset(cell, 0, need);
    m3_aggcell *c = (m3_aggcell *)cell;
    c->magic = CELL_MAGIC;
    c->version = M3_AGG_VERSION;
    c->flags = (uint16_t)flags_for(p);
    c->p = *p;
    c->done_widx = WIDX_NONE;
    c->due_ms = INT64_MAX;
    c->lo_widx = INT64_MAX;
    c->hi_widx = WIDX_NONE;
    for (uint32_t k = 0; k < p->nwin; k++) cell_win(c, k)->widx = WIDX_NONE;
    return M3_OK;
}

int m3_agg_cell_check(uint8_t *cell, uint64_t cap)
{
    if (!cell || cap < sizeof(m3_aggcell)) return M3_EINVAL;
    m3_aggcell *c = (m3_aggcell *)cell;
    if (c->magic != CELL_MAGIC) return M3_ECORRUPT;
    if (c->version != M3_AGG_VERSION) return M3_EVERSION;
    if (m3_agg_params_check(&c->p) || c->flags != flags_for(&c->p)) return M3_ECORRUPT;
    if (m3_agg_cell_bytes(&c->p) > cap) return M3_ECORRUPT;
    int64_t lo = INT64_MAX, hi = WIDX_NONE;
    for (uint32_t k = 0; k < c->p.nwin; k++) {
        m3_aggwin *w = cell_win(c, k);
        if (w->widx == WIDX_NONE) continue;
        int64_t m = w->widx % (int64_t)c->p.nwin;
        if (m < 0) m += c->p.nwin;
        if (m != (int64_t)k || w->widx <= c->done_widx || w->count == 0 ||
            w->widx > TS_LIMIT / c->p.res_ms || w->widx < -TS_LIMIT / c->p.res_ms) {
            w->widx = WIDX_NONE;  /* a slot a killed writer left half-made: drop it */
            continue;
        }
        if (w->widx < lo) lo = w->widx;
        if (w->widx > hi) hi = w->widx;
    }
    if (hi != WIDX_NONE && hi - lo >= (int64_t)c->p.nwin) {
        /* open windows must be nwin consecutive ones at most: keep the newest */
        for (uint32_t k = 0; k < c->p.nwin; k++) {
            m3_aggwin *w = cell_win(c, k);
            if (w->widx != WIDX_NONE && w->widx <= hi - (int64_t)c->p.nwin) w->widx = WIDX_NONE;
        }
        lo = hi - (int64_t)c->p.nwin + 1;
    }
    c->lo_widx = hi == WIDX_NONE ? INT64_MAX : lo;
    c->hi_widx = hi;
    if (hi != WIDX_NONE && hi - (int64_t)c->p.nwin > c->done_widx)
        c->done_widx = hi - (int64_t)c->p.nwin;
    set_due(c);
    return M3_OK;
}

/* ---- transforms -------------------------------------------------------------------------- */

/* Apply one transform; returns 0 when the value is consumed (no output). */
static int xf_step(uint8_t op, m3_xstate *st, int64_t ts, double *v, int64_t *from)
{
    double x = *v;
    switch (op) {
    case M3_XF_ABSOLUTE:
        *v = fabs(x);
        return 1;
    case M3_XF_ADD:
        st->acc += x;
        *v = st->acc;
        return 1;
    case M3_XF_INCREASE:
    case M3_XF_PERSECOND: {
        if (!st->have) {
            st->have = 1;
            st->prev = x;
            st->prev_ts = ts;
            return 0;
        }
        double d = x - st->prev;
        if (d < 0) d = x;            /* the counter restarted at 0 */
        int64_t pts = st->prev_ts;
        st->prev = x;
        st->prev_ts = ts;
        if (from) *from = pts;
        if (op == M3_XF_PERSECOND) {
            if (ts <= pts) return 0;
            /* in doubles: a cell read back after a crash may hold any prev_ts */
            d = d / (((double)ts - (double)pts) / 1000.0);
        }
        *v = d;
        return 1;
    }
    default:
        return 1;
    }
}

static int chain_ordered(const uint8_t *ops)
{
    for (int k = 0; k < M3_AGG_MAX_OPS && ops[k]; k++) {
        if (ops[k] != M3_XF_ABSOLUTE) return 1;
    }
    return 0;
}

/* ---- windows ----------------------------------------------------------------------------- */

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) q--;
    return q;
}

static void win_open(m3_aggcell *c, m3_aggwin *w, uint32_t slot, int64_t widx)
{
    memset(w, 0, sizeof(*w));
    w->widx = widx;
    w->first_ts = INT64_MAX;
    w->last_ts = INT64_MIN;
    w->min = INFINITY;
    w->max = -INFINITY;
    if (c->flags & FLAG_SKETCH) m3_sketch_init(cell_sketch(c, slot));
    if (c->hi_widx == WIDX_NONE || widx < c->lo_widx) c->lo_widx = widx;
    if (c->hi_widx == WIDX_NONE || widx > c->hi_widx) {
        /* the ring holds nwin consecutive windows: with this one open, windows at or below
           widx - nwin can never be opened again, so they are final (the caller has already
           finalised any that were open) */
        c->hi_widx = widx;
        if (widx - (int64_t)c->p.nwin > c->done_widx) c->done_widx = widx - (int64_t)c->p.nwin;
    }
    int64_t due = (c->lo_widx + 1) * c->p.res_ms + c->p.admission_ms;
    if (due < c->due_ms) c->due_ms = due;
}

static void win_add(m3_aggcell *c, m3_aggwin *w, uint32_t slot, int64_t ts, int64_t from,
                    double v)
{
    if (c->flags & FLAG_SKETCH) m3_sketch_add(cell_sketch(c, slot), v);
    w->count++;
    if (ts >= w->last_ts) {
        w->last_ts = ts;
        w->last = v;
    }
    if (from < w->first_ts) w->first_ts = from;
    const uint32_t m = c->p.aggmask;
    if (v < w->min) w->min = v;   /* also clamp the sketch's estimates */
    if (v > w->max) w->max = v;
    if (m & ((1u << M3_AGG_SUM) | (1u << M3_AGG_MEAN))) {
        /* Neumaier: keep the low-order bits the running sum loses */
        double t = w->sum + v;
        if (fabs(w->sum) >= fabs(v)) w->sum_c += (w->sum - t) + v;
        else w->sum_c += (v - t) + w->sum;
        w->sum = t;
    }
    if (m & (1u << M3_AGG_STDEV)) {
        double d = v - w->mean;
        w->mean += d / (double)w->count;
        w->m2 += d * (v - w->mean);
    }
    if (m & (1u << M3_AGG_SUMSQ)) w->sumsq += v * v;
}

static const double QUANTILE_OF[22] = {
    [M3_AGG_MEDIAN] = 0.5, [M3_AGG_P10] = 0.1, [M3_AGG_P20] = 0.2, [M3_AGG_P30] = 0.3,
    [M3_AGG_P40] = 0.4, [M3_AGG_P50] = 0.5, [M3_AGG_P60] = 0.6, [M3_AGG_P70] = 0.7,
    [M3_AGG_P80] = 0.8, [M3_AGG_P90] = 0.9, [M3_AGG_P95] = 0.95, [M3_AGG_P99] = 0.99,
    [M3_AGG_P999] = 0.999, [M3_AGG_P9999] = 0.9999,
};

/* The value of one aggregation of a window; returns 0 when there is none. */
static int win_value(m3_aggcell *c, uint32_t slot, const m3_aggwin *w, int agg, double *out)
{
    switch (agg) {
    case M3_AGG_LAST: *out = w->last; return 1;
    case M3_AGG_MIN: *out = w->min; return 1;
    case M3_AGG_MAX: *out = w->max; return 1;
    case M3_AGG_MEAN: *out = (w->sum + w->sum_c) / (double)w->count; return 1;
    case M3_AGG_COUNT: *out = (double)w->count; return 1;
    case M3_AGG_SUMSQ: *out = w->sumsq; return 1;
    case M3_AGG_STDEV:
        *out = w->count < 2 ? 0.0 : sqrt(w->m2 / (double)(w->count - 1));
        return 1;
    case M3_AGG_SUM:
        *out = w->sum + w->sum_c;
        if (c->flags & FLAG_RATE) {
            if (w->last_ts <= w->first_ts) return 0;
            *out /= ((double)w->last_ts - (double)w->first_ts) / 1000.0;
        }
        return 1;
    default:
        *out = m3_sketch_quantile(cell_sketch(c, slot), QUANTILE_OF[agg], w->min, w->max);
        return 1;
    }
}

/* Finalise the window in `slot`: one row per aggregation (after post transforms). */
static void win_emit(m3_aggcell *c, uint32_t cell, uint32_t slot, m3_agg_out *out,
                     size_t *nout)
{
    m3_aggwin *w = cell_win(c, slot);
    int64_t end = (w->widx + 1) * c->p.res_ms;
    M3_ASSERT(w->widx > c->done_widx || c->done_widx == WIDX_NONE);
    for (uint32_t m = c->p.aggmask; m; m &= m - 1) {
        int agg = __builtin_ctz(m);
        double v;
        if (!win_value(c, slot, w, agg, &v)) continue;
        int keep = 1;
        for (int k = 0; k < M3_AGG_MAX_OPS && c->p.post[k] && keep; k++)
            keep = xf_step(c->p.post[k], &c->post_st[k], end, &v, 0);
        if (!keep) continue;
        out[*nout].cell = cell;
        out[*nout].agg = (uint32_t)agg;
        out[*nout].ts = end;
        out[*nout].value = v;
        (*nout)++;
    }
    if (w->widx > c->done_widx) c->done_widx = w->widx;
    w->widx = WIDX_NONE;
    c->emitted++;
}

/* Finalise open windows with widx <= upto, oldest first, while out has room for a window's
   rows. Walks widx from lo_widx, so it touches only the slots of windows it may finalise.
   Returns 0 if all were finalised, M3_ENOSPC if it stopped for room. */
static int finalise_upto(m3_aggcell *c, uint32_t cell, int64_t upto, m3_agg_out *out,
                         size_t cap, size_t *nout)
{
    size_t rows = (size_t)popcount32(c->p.aggmask);
    const int64_t nwin = c->p.nwin;
    int rc = M3_OK;
    if (c->hi_widx == WIDX_NONE) return rc;
    int64_t last = upto < c->hi_widx ? upto : c->hi_widx;
    /* windows below hi - nwin + 1 cannot be open (the ring holds nwin consecutive ones) */
    int64_t w = c->lo_widx > c->hi_widx - nwin + 1 ? c->lo_widx : c->hi_widx - nwin + 1;
    for (; w <= last; w++) {
        uint32_t slot = (uint32_t)(((w % nwin) + nwin) % nwin);
        if (cell_win(c, slot)->widx != w) continue;
        if (cap - *nout < rows) { rc = M3_ENOSPC; break; }
        win_emit(c, cell, slot, out, nout);
    }
    if (w > c->lo_widx) c->lo_widx = w;
    set_due(c);
    return rc;
}

/* Replay after a full restart (set on the replaying thread by csrc/aggstore.c): a sample for
   a window final at the replay's `now` was counted in that window before the crash, so it
   still moves an ordered pre chain's state (the next on-time sample's increase starts from
   it, as it did live), without being applied. */
static _Thread_local int late_moves_pre;

void m3_agg_replay_late(int on) { late_moves_pre = on; }

static void pre_state_only(m3_aggcell *c, int64_t t, double x)
{
    int64_t from = t;
    c->pre_seen = 1;
    c->pre_last_ts = t;
    for (int k = 0; k < M3_AGG_MAX_OPS && c->p.pre[k]; k++) {
        uint8_t op = c->p.pre[k] == M3_XF_PERSECOND ? M3_XF_INCREASE : c->p.pre[k];
        if (!xf_step(op, &c->pre_st[k], t, &x, &from)) break;
    }
}

int m3_agg_seal(uint8_t *cell, uint64_t cap, int64_t end, double v)
{
    m3_aggcell *c = (m3_aggcell *)cell;
    if (!cell || cap < sizeof(m3_aggcell) || c->magic != CELL_MAGIC || c->p.res_ms <= 0 ||
        c->p.nwin < 1 || c->p.nwin > M3_AGG_MAX_WINDOWS ||
        sizeof(m3_aggcell) + (uint64_t)c->p.nwin * win_bytes(c->flags) > cap ||
        end % c->p.res_ms || end > TS_LIMIT || end < -TS_LIMIT || isnan(v))
        return M3_EINVAL;
    int64_t widx = end / c->p.res_ms - 1;
    if (c->done_widx != WIDX_NONE && widx < c->done_widx) return 0;  /* an older point */
    for (uint32_t k = 0; k < c->p.nwin; k++) {
        m3_aggwin *w = cell_win(c, k);
        if (w->widx != WIDX_NONE && w->widx <= widx) w->widx = WIDX_NONE;  /* written */
    }
    c->done_widx = widx;
    if (c->hi_widx != WIDX_NONE && c->lo_widx <= widx) c->lo_widx = widx + 1;
    set_due(c);
    if (c->p.post[0] == M3_XF_ADD && c->p.post[1] == M3_XF_NONE &&
        popcount32(c->p.aggmask) == 1) {
        c->post_st[0].acc = v;  /* the running total the written point holds */
        c->post_st[0].have = 1;
    }
    return 1;
}

int m3_agg_take_pre(uint8_t *cell, uint64_t cap, const uint8_t *from, uint64_t from_cap)
{
    m3_aggcell *c = (m3_aggcell *)cell;
    const m3_aggcell *f = (const m3_aggcell *)from;
    if (!cell || !from || cap < sizeof(m3_aggcell) || from_cap < sizeof(m3_aggcell) ||
        c->magic != CELL_MAGIC || f->magic != CELL_MAGIC)
        return M3_EINVAL;
    if (!chain_ordered(c->p.pre) || c->pre_seen || !f->pre_seen ||
        memcmp(c->p.pre, f->p.pre, sizeof c->p.pre) != 0)
        return 0;
    memcpy(c->pre_st, f->pre_st, sizeof c->pre_st);
    c->pre_last_ts = f->pre_last_ts;
    c->pre_seen = 1;
    return 1;
}

static int apply_cell(m3_aggcell *c, uint32_t cell, const int64_t *ts, const double *v,
                      size_t n, int64_t now, m3_agg_out *out, size_t cap, size_t *nout,
                      size_t *done)
{
    const int64_t res = c->p.res_ms, adm = c->p.admission_ms;
    const uint32_t nwin = c->p.nwin;
    const int ordered = chain_ordered(c->p.pre);
    const int has_pre = c->p.pre[0] != M3_XF_NONE;
    /* the window of the previous sample and its slot: most samples fall in it, and then
       neither index needs a division */
    int64_t cur = WIDX_NONE, cur_lo = 0, cur_hi = -1;
    uint32_t cur_slot = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t t = ts[i];
        double x = v[i];
        if (isnan(x) || t > TS_LIMIT || t < -TS_LIMIT) { c->invalid++; continue; }
        int64_t widx = (t > cur_lo && t <= cur_hi) ? cur : floor_div(t - 1, res);
        if (widx <= c->done_widx || (widx + 1) * res + adm <= now) {
            /* the window is final: count the sample, never apply it (transform state too,
               except in replay: see m3_agg_replay_late) */
            c->late++;
            if (late_moves_pre && has_pre && ordered && !(c->pre_seen && t <= c->pre_last_ts))
                pre_state_only(c, t, x);
            continue;
        }
        if (c->hi_widx != WIDX_NONE && widx - (int64_t)nwin >= c->lo_widx) {
            /* the ring holds nwin consecutive windows: finalise (early) every open window at
               or below widx - nwin before this one opens. Checked before the transforms, so
               an M3_ENOSPC return leaves sample i untouched for the resume. */
            size_t need = 0;
            for (uint32_t k = 0; k < nwin; k++) {  /* rare: only when windows are skipped */
                int64_t x2 = cell_win(c, k)->widx;
                if (x2 != WIDX_NONE && x2 <= widx - (int64_t)nwin) need++;
            }
            if (cap - *nout < need * (size_t)popcount32(c->p.aggmask)) {
                *done = i;
                return M3_ENOSPC;
            }
            uint64_t before = c->emitted;
            finalise_upto(c, cell, widx - (int64_t)nwin, out, cap, nout);
            c->evicted += c->emitted - before;
            if (widx - (int64_t)nwin > c->done_widx) c->done_widx = widx - (int64_t)nwin;
        }
        int64_t from = t;
        if (has_pre) {
            if (ordered) {
                if (c->pre_seen && t <= c->pre_last_ts) {
                    c->ooo++;
                    continue;
                }
                c->pre_seen = 1;
                c->pre_last_ts = t;
            }
            int keep = 1;
            for (int k = 0; k < M3_AGG_MAX_OPS && c->p.pre[k] && keep; k++) {
                /* a rate cell sums increments; its windows divide by their span */
                uint8_t op = c->p.pre[k] == M3_XF_PERSECOND ? M3_XF_INCREASE : c->p.pre[k];
                keep = xf_step(op, &c->pre_st[k], t, &x, &from);
            }
            if (!keep) continue;
        }
        uint32_t slot = widx == cur ? cur_slot
                                    : (uint32_t)(((widx % (int64_t)nwin) + nwin) % nwin);
        m3_aggwin *w = cell_win(c, slot);
        if (w->widx != widx) {
            if (w->widx != WIDX_NONE) {
                /* impossible: an open window in this slot is > widx - nwin and != widx,
                   so it is > widx, and opening it made done_widx >= widx */
                M3_ASSERT(0);
                c->late++;
                continue;
            }
            win_open(c, w, slot, widx);
        }
        win_add(c, w, slot, t, from, x);
        c->applied++;
        cur = widx;
        cur_slot = slot;
        cur_lo = widx * res;
        cur_hi = cur_lo + res;
    }
    *done = n;
    return M3_OK;
}

/* Note on the transform state above: a transform takes a sample's value into its state even
   when a later step of the chain drops it; a late or NaN sample changes no state at all. */

static int64_t clamp_now(int64_t now)
{
    return now > TS_LIMIT ? TS_LIMIT : now < -TS_LIMIT ? -TS_LIMIT : now;
}

static m3_aggcell *cell_at(uint8_t *base, uint64_t stride, uint32_t ncells, uint32_t cell)
{
    if (!base || cell >= ncells || stride < sizeof(m3_aggcell) || (stride & 7)) return 0;
    m3_aggcell *c = (m3_aggcell *)(base + (uint64_t)cell * stride);
    /* cheap checks only (this runs per run of samples): init validated the parameters, and
       m3_agg_cell_check re-validates them after a restart */
    if (c->magic != CELL_MAGIC || c->p.nwin < 1 || c->p.nwin > M3_AGG_MAX_WINDOWS ||
        sizeof(m3_aggcell) + (uint64_t)c->p.nwin * win_bytes(c->flags) > stride ||
        c->p.res_ms <= 0)
        return 0;
    return c;
}

int m3_agg_apply(uint8_t *base, uint64_t stride, uint32_t ncells, uint32_t cell, uint64_t seq,
                 const int64_t *ts, const double *v, size_t n, int64_t now_ms,
                 m3_agg_out *out, size_t cap, size_t *nout, size_t *done)
{
    m3_aggcell *c = cell_at(base, stride, ncells, cell);
    if (!c || !nout || !done || *nout > cap || (n && (!ts || !v)) || (cap && !out))
        return M3_EINVAL;
    *done = 0;
    if (seq && seq <= c->last_seq) {
        c->dup += n;
        *done = n;
        return M3_OK;
    }
    int rc = apply_cell(c, cell, ts, v, n, clamp_now(now_ms), out, cap, nout, done);
    if (rc == M3_OK && seq) c->last_seq = seq;
    return rc;
}

int m3_agg_apply_runs(uint8_t *base, uint64_t stride, uint32_t ncells, const uint32_t *run_cell,
                      const uint64_t *run_start, const uint64_t *run_end, size_t nruns,
                      uint64_t seq, const int64_t *ts, const double *v, int64_t now_ms,
                      m3_agg_out *out, size_t cap, size_t *nout, size_t *done_runs,
                      size_t *done)
{
    if (!done_runs || !done || (nruns && (!run_cell || !run_start || !run_end)))
        return M3_EINVAL;
    *done_runs = 0;
    *done = 0;
    for (size_t r = 0; r < nruns; r++) {
        uint64_t a = run_start[r], b = run_end[r];
        if (b < a) return M3_EINVAL;
        size_t got = 0;
        int rc = m3_agg_apply(base, stride, ncells, run_cell[r], seq, ts + a, v + a,
                              (size_t)(b - a), now_ms, out, cap, nout, &got);
        if (rc != M3_OK) {
            *done = got;
            return rc;
        }
        *done_runs = r + 1;
    }
    return M3_OK;
}

int m3_agg_finalise(uint8_t *base, uint64_t stride, uint32_t ncells, uint32_t first,
                    int64_t now_ms, m3_agg_out *out, size_t cap, size_t *nout, uint32_t *next)
{
    if (!base || !nout || !next || *nout > cap || (cap && !out) || (stride & 7) ||
        stride < sizeof(m3_aggcell))
        return M3_EINVAL;
    now_ms = clamp_now(now_ms);
    for (uint32_t i = first; i < ncells; i++) {
        m3_aggcell *c = (m3_aggcell *)(base + (uint64_t)i * stride);
        if (c->magic != CELL_MAGIC) continue;  /* an unused cell */
        if (c->due_ms > now_ms) continue;
        /* windows with (widx + 1) * res + admission <= now are final */
        int64_t upto = floor_div(now_ms - c->p.admission_ms, c->p.res_ms) - 1;
        if (finalise_upto(c, i, upto, out, cap, nout) != M3_OK) {
            *next = i;
            return M3_ENOSPC;
        }
        if (upto > c->done_widx) c->done_widx = upto;
    }
    *next = ncells;
    return M3_OK;
}

/* ---- undo of one apply (csrc/aggstore.c: an owner killed mid-record) ---------------------
   Layout: magic <u32> first slot <u32> slots <u32> pad <u32> | the cell header | the saved
   window slots (first, first+1, ... mod nwin) | their sketches (if the cell has them). An
   apply changes only the header, the slots of its samples' windows and, when it evicts, the
   slots of the evicted windows: a record whose windows may evict (or span the ring) saves
   every slot. */
#define UNDO_MAGIC 0x4f444e55u /* "UNDO" */

uint64_t m3_agg_undo_save(const uint8_t *cell, uint64_t cap, const int64_t *ts, size_t n,
                          uint8_t *undo, uint64_t undo_cap)
{
    const m3_aggcell *c = (const m3_aggcell *)cell;
    const uint64_t nwin = c->p.nwin, wb = sizeof(m3_aggwin);
    const uint64_t sk = (c->flags & FLAG_SKETCH) ? sizeof(m3_sketch) : 0;
    if (cap < sizeof(m3_aggcell) || nwin == 0 || c->p.res_ms <= 0 ||
        sizeof(m3_aggcell) + nwin * (wb + sk) > cap)
        return 0;
    int64_t tmin = INT64_MAX, tmax = INT64_MIN;
    for (size_t i = 0; i < n; i++) {
        int64_t t = ts[i];
        if (t > TS_LIMIT || t < -TS_LIMIT) continue;  /* skipped by the apply */
        if (t < tmin) tmin = t;
        if (t > tmax) tmax = t;
    }
    uint64_t first = 0, count = 0;
    if (tmin <= tmax) {
        int64_t wmin = floor_div(tmin - 1, c->p.res_ms), wmax = floor_div(tmax - 1, c->p.res_ms);
        int evicts = c->hi_widx != WIDX_NONE && wmax - (int64_t)nwin >= c->lo_widx;
        if (evicts || (uint64_t)(wmax - wmin) + 1 >= nwin) {
            count = nwin;
        } else {
            first = (uint64_t)(((wmin % (int64_t)nwin) + (int64_t)nwin) % (int64_t)nwin);
            count = (uint64_t)(wmax - wmin) + 1;
        }
    }
    uint64_t need = 16 + sizeof(m3_aggcell) + count * (wb + sk);
    if (need > undo_cap)
        return 0;
    uint32_t head[4] = {UNDO_MAGIC, (uint32_t)first, (uint32_t)count, 0};
    memcpy(undo, head, 16);
    uint8_t *o = undo + 16;
    memcpy(o, cell, sizeof(m3_aggcell));
    o += sizeof(m3_aggcell);
    const uint8_t *w0 = cell + sizeof(m3_aggcell), *s0 = w0 + nwin * wb;
    for (uint64_t i = 0; i < count; i++, o += wb)
        memcpy(o, w0 + ((first + i) % nwin) * wb, wb);
    for (uint64_t i = 0; sk && i < count; i++, o += sk)
        memcpy(o, s0 + ((first + i) % nwin) * sk, sk);
    return need;
}

int m3_agg_undo_restore(uint8_t *cell, uint64_t cap, const uint8_t *undo, uint64_t undo_cap)
{
    uint32_t head[4];
    if (undo_cap < 16 + sizeof(m3_aggcell) || cap < sizeof(m3_aggcell))
        return M3_ECORRUPT;
    memcpy(head, undo, 16);
    const m3_aggcell *saved = (const m3_aggcell *)(undo + 16);
    const uint64_t nwin = saved->p.nwin, wb = sizeof(m3_aggwin);
    const uint64_t sk = (saved->flags & FLAG_SKETCH) ? sizeof(m3_sketch) : 0;
    const uint64_t first = head[1], count = head[2];
    if (head[0] != UNDO_MAGIC || nwin == 0 || first >= nwin || count > nwin ||
        sizeof(m3_aggcell) + nwin * (wb + sk) > cap ||
        16 + sizeof(m3_aggcell) + count * (wb + sk) > undo_cap)
        return M3_ECORRUPT;
    const uint8_t *o = undo + 16 + sizeof(m3_aggcell);
    uint8_t *w0 = cell + sizeof(m3_aggcell), *s0 = w0 + nwin * wb;
    for (uint64_t i = 0; i < count; i++, o += wb)
        memcpy(w0 + ((first + i) % nwin) * wb, o, wb);
    for (uint64_t i = 0; sk && i < count; i++, o += sk)
        memcpy(s0 + ((first + i) % nwin) * sk, o, sk);
    memcpy(cell, saved, sizeof(m3_aggcell));
    return M3_OK;
}
