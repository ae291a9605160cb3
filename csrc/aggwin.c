/*
 * aggwin.c -- aggregation windows and transforms: the C half of downsampling and rollups.
 *
 * A cell (m3_aggcell, docs/formats/aggwin.md) holds everything one (series or rollup group,
 * storage policy, rule) needs to turn raw samples into one aggregated point per window:
 *
 *   header | transform state (opt.) | nwin windows (a ring indexed by widx mod nwin) |
 *   nwin sketches (opt.)
 *
 * Compact layout. A cell holds only what its parameters need: the transform state only when it
 * has transforms (one xstate per op), and a window only the 8-byte fields its aggregations read
 * (enum wfield; a Last window is (last_ts, last), 16 bytes). `layout_of` derives where every
 * part is from the parameters alone, so nothing about the layout is stored and a cell read
 * back after a crash is laid out by its own header. A window stores no index: last_ts, the
 * time of its latest sample, lies inside it and so names it; INT64_MIN marks an unused slot.
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

static uint32_t flags_for(const m3_agg_params *p)
{
    uint32_t f = 0;
    int npre = chain_len(p->pre);
    if (p->aggmask & M3_AGG_SKETCH_MASK) f |= FLAG_SKETCH;
    if (npre && p->pre[npre - 1] == M3_XF_PERSECOND) f |= FLAG_RATE;
    return f;
}

/* Window fields (8 bytes each), in the order a window lays out those it has. last_ts is always
   there: INT64_MIN marks an unused slot, and since it is the time of a sample of the window it
   also names the window (widx = floor((last_ts - 1) / res)), so a window stores no index.
   sum_c always follows sum, and m2 mean (each pair is kept or dropped together). */
enum wfield {
    F_LAST_TS, F_LAST, F_COUNT, F_MIN, F_MAX, F_SUM, F_SUM_C, F_FIRST_TS, F_MEAN, F_M2, F_SUMSQ,
    NFIELDS
};

#define BIT(a) (1u << (a))

/* One 8-byte word of a window: i64 times, u64 counts, f64 values. */
typedef union wword {
    int64_t i;
    uint64_t u;
    double d;
} wword;

/* Transform state after the header, present only in a cell with transforms: the ordered pre
   chain's last sample (when there is a pre chain), then an xstate per pre op, then per post op. */
typedef struct xhead {
    int64_t pre_last_ts;   /* timestamp of the last sample an ordered pre chain took */
    uint64_t pre_seen;     /* 1 once pre_last_ts is set */
} xhead;

/* Where a cell's parts are: computed from its parameters alone (never stored). */
typedef struct layout {
    uint32_t head;         /* bytes before window 0: header + transform state */
    uint32_t post_at;      /* offset of the post xstates */
    uint32_t wb;           /* bytes of one window */
    uint32_t sk;           /* bytes of one sketch (0 = none) */
    uint32_t rate;         /* a rate cell (flags & FLAG_RATE) */
    int32_t at[NFIELDS];   /* word of each field in a window; -1 = not kept (int32_t, not a
                              char type: stores to windows cannot alias it) */
} layout;

_Static_assert(sizeof(xhead) == 16 && sizeof(m3_xstate) == 32, "transform state layout");
_Static_assert(sizeof(m3_sketch) % 8 == 0, "sketches are 8-byte aligned");
_Static_assert(sizeof(m3_aggcell) % 8 == 0, "cells are 8-byte aligned");

/* Any params (even garbage read back from memory) give a layout within bounds of nwin: chain
   lengths are capped at M3_AGG_MAX_OPS and every field is one word. */
static void layout_of(const m3_agg_params *p, layout *L)
{
    const uint32_t m = p->aggmask, f = flags_for(p);
    const int npre = chain_len(p->pre), npost = chain_len(p->post);
    uint32_t want = BIT(F_LAST_TS);
    if (m & BIT(M3_AGG_LAST)) want |= BIT(F_LAST);
    if (m & (BIT(M3_AGG_MEAN) | BIT(M3_AGG_COUNT) | BIT(M3_AGG_STDEV))) want |= BIT(F_COUNT);
    if ((m & BIT(M3_AGG_MIN)) || (f & FLAG_SKETCH)) want |= BIT(F_MIN);  /* sketch clamps */
    if ((m & BIT(M3_AGG_MAX)) || (f & FLAG_SKETCH)) want |= BIT(F_MAX);
    if (m & (BIT(M3_AGG_SUM) | BIT(M3_AGG_MEAN))) want |= BIT(F_SUM) | BIT(F_SUM_C);
    if (f & FLAG_RATE) want |= BIT(F_FIRST_TS);
    if (m & BIT(M3_AGG_STDEV)) want |= BIT(F_MEAN) | BIT(F_M2);
    if (m & BIT(M3_AGG_SUMSQ)) want |= BIT(F_SUMSQ);
    int32_t n = 0;
    for (int k = 0; k < NFIELDS; k++) L->at[k] = (want & BIT(k)) ? n++ : -1;
    L->wb = (uint32_t)n * 8;
    L->sk = (f & FLAG_SKETCH) ? (uint32_t)sizeof(m3_sketch) : 0;
    L->rate = (f & FLAG_RATE) != 0;
    L->post_at = (uint32_t)sizeof(m3_aggcell) +
                 (npre ? (uint32_t)(sizeof(xhead) + npre * sizeof(m3_xstate)) : 0);
    L->head = L->post_at + (uint32_t)(npost * sizeof(m3_xstate));
}

/* layout_of for the hot paths (apply per run of samples, finalise per due cell): the last
   parameters seen on this thread and their layout, since the cells of a rule set mostly share
   their parameters. A plain per-thread copy: nothing shared, nothing persisted. */
static void layout_get(const m3_agg_params *p, layout *L)
{
    static _Thread_local m3_agg_params last_p;
    static _Thread_local layout last_l;
    static _Thread_local int have;
    if (have && memcmp(&last_p, p, sizeof last_p) == 0) {
        *L = last_l;
        return;
    }
    layout_of(p, L);
    last_p = *p;
    last_l = *L;
    have = 1;
}

_Static_assert(sizeof(m3_agg_params) == 32, "params have no padding (layout_get compares bytes)");

static uint64_t layout_bytes(const layout *L, uint32_t nwin)
{
    return L->head + (uint64_t)nwin * (L->wb + L->sk);
}

uint64_t m3_agg_cell_bytes(const m3_agg_params *p)
{
    if (m3_agg_params_check(p)) return 0;
    layout L;
    layout_of(p, &L);
    return layout_bytes(&L, p->nwin);
}

int m3_agg_cell_layout(const m3_agg_params *p, uint32_t *head_bytes, uint32_t *win_bytes,
                       uint32_t *sketch_bytes)
{
    if (m3_agg_params_check(p) || !head_bytes || !win_bytes || !sketch_bytes) return M3_EINVAL;
    layout L;
    layout_of(p, &L);
    *head_bytes = L.head;
    *win_bytes = L.wb;
    *sketch_bytes = L.sk;
    return M3_OK;
}

static wword *cell_win(m3_aggcell *c, const layout *L, uint32_t slot)
{
    return (wword *)((uint8_t *)c + L->head + (uint64_t)slot * L->wb);
}

static m3_sketch *cell_sketch(m3_aggcell *c, const layout *L, uint32_t slot)
{
    uint8_t *s0 = (uint8_t *)c + L->head + (uint64_t)c->p.nwin * L->wb;
    return (m3_sketch *)s0 + slot;
}

static xhead *cell_xhead(m3_aggcell *c) { return (xhead *)(c + 1); }

static m3_xstate *cell_pre(m3_aggcell *c) { return (m3_xstate *)(cell_xhead(c) + 1); }

static m3_xstate *cell_post(m3_aggcell *c, const layout *L)
{
    return (m3_xstate *)((uint8_t *)c + L->post_at);
}

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) q--;
    return q;
}

/* The window a slot holds (WIDX_NONE: unused), from its last sample's time. */
static int64_t win_widx(const m3_aggcell *c, const wword *w)
{
    return w[F_LAST_TS].i == WIDX_NONE ? WIDX_NONE : floor_div(w[F_LAST_TS].i - 1, c->p.res_ms);
}

/* Whether the slot holds window widx: its last sample lies in (widx*res, (widx+1)*res]. */
static int win_is(const m3_aggcell *c, const wword *w, int64_t widx)
{
    int64_t lo = widx * c->p.res_ms;
    return w[F_LAST_TS].i > lo && w[F_LAST_TS].i <= lo + c->p.res_ms;
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
    layout L;
    layout_of(p, &L);
    for (uint32_t k = 0; k < p->nwin; k++) cell_win(c, &L, k)[F_LAST_TS].i = WIDX_NONE;
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
    layout L;
    layout_of(&c->p, &L);
    const int64_t nwin = c->p.nwin;
    int64_t lo = INT64_MAX, hi = WIDX_NONE;
    for (uint32_t k = 0; k < nwin; k++) {
        wword *w = cell_win(c, &L, k);
        if (w[F_LAST_TS].i == WIDX_NONE) continue;
        int64_t x = w[F_LAST_TS].i > TS_LIMIT || w[F_LAST_TS].i < -TS_LIMIT ? WIDX_NONE
                                                                          : win_widx(c, w);
        int64_t m = x % nwin;
        if (m < 0) m += nwin;
        if (x == WIDX_NONE || m != (int64_t)k || x <= c->done_widx) {
            w[F_LAST_TS].i = WIDX_NONE;  /* a slot a killed writer left half-made: drop it */
            continue;
        }
        if (x < lo) lo = x;
        if (x > hi) hi = x;
    }
    if (hi != WIDX_NONE && hi - lo >= nwin) {
        /* open windows must be nwin consecutive ones at most: keep the newest */
        for (uint32_t k = 0; k < nwin; k++) {
            wword *w = cell_win(c, &L, k);
            int64_t x = win_widx(c, w);
            if (x != WIDX_NONE && x <= hi - nwin) w[F_LAST_TS].i = WIDX_NONE;
        }
        lo = hi - nwin + 1;
    }
    c->lo_widx = hi == WIDX_NONE ? INT64_MAX : lo;
    c->hi_widx = hi;
    if (hi != WIDX_NONE && hi - nwin > c->done_widx) c->done_widx = hi - nwin;
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
        st->have = 1;  /* the total has a value (m3_agg_take_post hands over only fresh ones) */
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

static const double QUANTILE_OF[22] = {
    [M3_AGG_MEDIAN] = 0.5, [M3_AGG_P10] = 0.1, [M3_AGG_P20] = 0.2, [M3_AGG_P30] = 0.3,
    [M3_AGG_P40] = 0.4, [M3_AGG_P50] = 0.5, [M3_AGG_P60] = 0.6, [M3_AGG_P70] = 0.7,
    [M3_AGG_P80] = 0.8, [M3_AGG_P90] = 0.9, [M3_AGG_P95] = 0.95, [M3_AGG_P99] = 0.99,
    [M3_AGG_P999] = 0.999, [M3_AGG_P9999] = 0.9999,
};
/* ---- windows ----------------------------------------------------------------------------- */

/* Open window widx in its slot. The slot stays unused (last_ts = WIDX_NONE) until win_add
   stores the first sample's time: a writer killed in between leaves an unused slot. */
static void win_open(m3_aggcell *c, const layout *L, wword *w, uint32_t slot, int64_t widx)
{
    memset(w, 0, L->wb);
    w[F_LAST_TS].i = WIDX_NONE;
    if (L->at[F_MIN] >= 0) w[L->at[F_MIN]].d = INFINITY;
    if (L->at[F_MAX] >= 0) w[L->at[F_MAX]].d = -INFINITY;
    if (L->at[F_FIRST_TS] >= 0) w[L->at[F_FIRST_TS]].i = INT64_MAX;
    if (L->sk) m3_sketch_init(cell_sketch(c, L, slot));
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

static void win_add(m3_aggcell *c, const layout *L, wword *w, uint32_t slot, int64_t ts,
                    int64_t from, double v)
{
    /* the offsets in locals, read once */
    const int32_t a_last = L->at[F_LAST], a_count = L->at[F_COUNT], a_first = L->at[F_FIRST_TS];
    const int32_t a_min = L->at[F_MIN], a_max = L->at[F_MAX], a_sum = L->at[F_SUM];
    const int32_t a_mean = L->at[F_MEAN], a_sumsq = L->at[F_SUMSQ];
    if (L->sk) m3_sketch_add(cell_sketch(c, L, slot), v);
    if (a_count >= 0) w[a_count].u++;
    if (ts >= w[F_LAST_TS].i) {
        w[F_LAST_TS].i = ts;
        if (a_last >= 0) w[a_last].d = v;
    }
    if (a_first >= 0 && from < w[a_first].i) w[a_first].i = from;
    if (a_min >= 0 && v < w[a_min].d) w[a_min].d = v;
    if (a_max >= 0 && v > w[a_max].d) w[a_max].d = v;
    if (a_sum >= 0) {
        /* Neumaier: keep the low-order bits the running sum loses (sum_c follows sum) */
        double s = w[a_sum].d, t = s + v;
        if (fabs(s) >= fabs(v)) w[a_sum + 1].d += (s - t) + v;
        else w[a_sum + 1].d += (v - t) + s;
        w[a_sum].d = t;
    }
    if (a_mean >= 0) {
        /* Welford (m2 follows mean); count was counted above (Stdev keeps it) */
        double mean = w[a_mean].d, d = v - mean;
        mean += d / (double)w[a_count].u;
        w[a_mean].d = mean;
        w[a_mean + 1].d += d * (v - mean);
    }
    if (a_sumsq >= 0) w[a_sumsq].d += v * v;
}

/* The value of one aggregation of a window; returns 0 when there is none. */
static int win_value(m3_aggcell *c, const layout *L, uint32_t slot, const wword *w, int agg,
                     double *out)
{
    const int32_t *at = L->at;
    switch (agg) {
    case M3_AGG_LAST: *out = w[at[F_LAST]].d; return 1;
    case M3_AGG_MIN: *out = w[at[F_MIN]].d; return 1;
    case M3_AGG_MAX: *out = w[at[F_MAX]].d; return 1;
    case M3_AGG_MEAN: *out = (w[at[F_SUM]].d + w[at[F_SUM_C]].d) / (double)w[at[F_COUNT]].u;
        return 1;
    case M3_AGG_COUNT: *out = (double)w[at[F_COUNT]].u; return 1;
    case M3_AGG_SUMSQ: *out = w[at[F_SUMSQ]].d; return 1;
    case M3_AGG_STDEV: {
        uint64_t n = w[at[F_COUNT]].u;
        *out = n < 2 ? 0.0 : sqrt(w[at[F_M2]].d / (double)(n - 1));
        return 1;
    }
    case M3_AGG_SUM:
        *out = w[at[F_SUM]].d + w[at[F_SUM_C]].d;
        if (L->rate) {
            int64_t first = w[at[F_FIRST_TS]].i, last = w[F_LAST_TS].i;
            if (last <= first) return 0;
            *out /= ((double)last - (double)first) / 1000.0;
        }
        return 1;
    default:
        if (!L->sk || agg >= (int)(sizeof(QUANTILE_OF) / sizeof(QUANTILE_OF[0]))) return 0;
        *out = m3_sketch_quantile(cell_sketch(c, L, slot), QUANTILE_OF[agg], w[at[F_MIN]].d,
                                  w[at[F_MAX]].d);
        return 1;
    }
}

/* Finalise window widx, held in `slot`: one row per aggregation (after post transforms). */
static void win_emit(m3_aggcell *c, const layout *L, uint32_t cell, uint32_t slot, int64_t widx,
                     m3_agg_out *out, size_t *nout)
{
    wword *w = cell_win(c, L, slot);
    int64_t end = (widx + 1) * c->p.res_ms;
    m3_xstate *post = cell_post(c, L);
    M3_ASSERT(widx > c->done_widx || c->done_widx == WIDX_NONE);
    for (uint32_t m = c->p.aggmask; m; m &= m - 1) {
        int agg = __builtin_ctz(m);
        double v;
        if (!win_value(c, L, slot, w, agg, &v)) continue;
        int keep = 1;
        for (int k = 0; k < M3_AGG_MAX_OPS && c->p.post[k] && keep; k++)
            keep = xf_step(c->p.post[k], &post[k], end, &v, 0);
        if (!keep) continue;
        out[*nout].cell = cell;
        out[*nout].agg = (uint32_t)agg;
        out[*nout].ts = end;
        out[*nout].value = v;
        (*nout)++;
    }
    if (widx > c->done_widx) c->done_widx = widx;
    w[F_LAST_TS].i = WIDX_NONE;
    c->emitted++;
}

/* Finalise open windows with widx <= upto, oldest first, while out has room for a window's
   rows. Walks widx from lo_widx, so it touches only the slots of windows it may finalise.
   Returns 0 if all were finalised, M3_ENOSPC if it stopped for room. */
static int finalise_upto(m3_aggcell *c, const layout *L, uint32_t cell, int64_t upto,
                         m3_agg_out *out, size_t cap, size_t *nout)
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
        if (!win_is(c, cell_win(c, L, slot), w)) continue;
        if (cap - *nout < rows) { rc = M3_ENOSPC; break; }
        win_emit(c, L, cell, slot, w, out, nout);
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
    xhead *xh = cell_xhead(c);
    m3_xstate *pre = cell_pre(c);
    int64_t from = t;
    xh->pre_seen = 1;
    xh->pre_last_ts = t;
    for (int k = 0; k < M3_AGG_MAX_OPS && c->p.pre[k]; k++) {
        uint8_t op = c->p.pre[k] == M3_XF_PERSECOND ? M3_XF_INCREASE : c->p.pre[k];
        if (!xf_step(op, &pre[k], t, &x, &from)) break;
    }
}

int m3_agg_seal(uint8_t *cell, uint64_t cap, int64_t end, double v)
{
    m3_aggcell *c = (m3_aggcell *)cell;
    if (!cell || cap < sizeof(m3_aggcell) || c->magic != CELL_MAGIC || c->p.res_ms <= 0 ||
        c->p.nwin < 1 || c->p.nwin > M3_AGG_MAX_WINDOWS ||
        end % c->p.res_ms || end > TS_LIMIT || end < -TS_LIMIT || isnan(v))
        return M3_EINVAL;
    layout L;
    layout_of(&c->p, &L);
    if (layout_bytes(&L, c->p.nwin) > cap)
        return M3_EINVAL;
    int64_t widx = end / c->p.res_ms - 1;
    if (c->done_widx != WIDX_NONE && widx < c->done_widx) return 0;  /* an older point */
    for (uint32_t k = 0; k < c->p.nwin; k++) {
        wword *w = cell_win(c, &L, k);
        int64_t x = win_widx(c, w);
        if (x != WIDX_NONE && x <= widx) w[F_LAST_TS].i = WIDX_NONE;  /* written */
    }
    c->done_widx = widx;
    if (c->hi_widx != WIDX_NONE && c->lo_widx <= widx) c->lo_widx = widx + 1;
    set_due(c);
    if (c->p.post[0] == M3_XF_ADD && c->p.post[1] == M3_XF_NONE &&
        popcount32(c->p.aggmask) == 1) {
        m3_xstate *post = cell_post(c, &L);
        post[0].acc = v;  /* the running total the written point holds */
        post[0].have = 1;
    }
    return 1;
}

/* Bytes up to the end of the pre transforms' state; 0 if the cell has no pre chain. */
static uint64_t pre_end(const m3_aggcell *c)
{
    int npre = chain_len(c->p.pre);
    return npre ? sizeof(m3_aggcell) + sizeof(xhead) + (uint64_t)npre * sizeof(m3_xstate) : 0;
}

int m3_agg_pre_last(const uint8_t *cell, uint64_t cap, int64_t *last_ts)
{
    const m3_aggcell *c = (const m3_aggcell *)cell;
    if (!cell || !last_ts || cap < sizeof(m3_aggcell) || c->magic != CELL_MAGIC) return 0;
    uint64_t end = pre_end(c);
    if (!end || cap < end) return 0;
    const xhead *xh = (const xhead *)(c + 1);
    if (!xh->pre_seen) return 0;
    *last_ts = xh->pre_last_ts;
    return 1;
}

int m3_agg_take_pre(uint8_t *cell, uint64_t cap, const uint8_t *from, uint64_t from_cap)
{
    m3_aggcell *c = (m3_aggcell *)cell;
    const m3_aggcell *f = (const m3_aggcell *)from;
    if (!cell || !from || cap < sizeof(m3_aggcell) || from_cap < sizeof(m3_aggcell) ||
        c->magic != CELL_MAGIC || f->magic != CELL_MAGIC)
        return M3_EINVAL;
    if (!chain_ordered(c->p.pre) || memcmp(c->p.pre, f->p.pre, sizeof c->p.pre) != 0)
        return 0;
    /* equal pre chains: the transform state sits at the same place in both cells */
    uint64_t end = pre_end(c);
    if (cap < end || from_cap < end) return M3_EINVAL;
    xhead *cx = cell_xhead(c);
    const xhead *fx = (const xhead *)(f + 1);
    if (cx->pre_seen || !fx->pre_seen) return 0;
    memcpy(cell_pre(c), fx + 1, end - sizeof(m3_aggcell) - sizeof(xhead));
    cx->pre_last_ts = fx->pre_last_ts;
    cx->pre_seen = 1;
    return 1;
}

/* A lone Add post transform over one aggregation (a rolled-up counter): its state, else NULL. */
static m3_xstate *lone_add(m3_aggcell *c, uint64_t cap)
{
    if (cap < sizeof(m3_aggcell) || c->magic != CELL_MAGIC || c->p.post[0] != M3_XF_ADD ||
        c->p.post[1] != M3_XF_NONE || popcount32(c->p.aggmask) != 1)
        return NULL;
    layout L;
    layout_of(&c->p, &L);
    if (L.post_at + sizeof(m3_xstate) > cap)
        return NULL;
    return cell_post(c, &L);
}

int m3_agg_post_fresh(const uint8_t *cell, uint64_t cap)
{
    m3_xstate *st = cell ? lone_add((m3_aggcell *)cell, cap) : NULL;
    return st && !st->have;
}

int m3_agg_take_post(uint8_t *cell, uint64_t cap, const uint8_t *from, uint64_t from_cap)
{
    if (!cell || !from)
        return M3_EINVAL;
    m3_aggcell *c = (m3_aggcell *)cell;
    m3_aggcell *f = (m3_aggcell *)from;
    m3_xstate *st = lone_add(c, cap), *fs = lone_add(f, from_cap);
    if (!st || !fs || st->have || !fs->have || f->p.aggmask != c->p.aggmask ||
        f->p.res_ms != c->p.res_ms)
        return 0;
    st->acc = fs->acc;  /* a killed writer leaves have 0: taken again, the same value */
    st->have = 1;
    return 1;
}

static int apply_cell(m3_aggcell *c, const layout *L, uint32_t cell, const int64_t *ts,
                      const double *v, size_t n, int64_t now, m3_agg_out *out, size_t cap,
                      size_t *nout, size_t *done)
{
    const int64_t res = c->p.res_ms, adm = c->p.admission_ms;
    const uint32_t nwin = c->p.nwin;
    const int ordered = chain_ordered(c->p.pre);
    const int has_pre = c->p.pre[0] != M3_XF_NONE;
    xhead *xh = cell_xhead(c);
    m3_xstate *pre = cell_pre(c);
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
            if (late_moves_pre && has_pre && ordered && !(xh->pre_seen && t <= xh->pre_last_ts))
                pre_state_only(c, t, x);
            continue;
        }
        if (c->hi_widx != WIDX_NONE && widx - (int64_t)nwin >= c->lo_widx) {
            /* the ring holds nwin consecutive windows: finalise (early) every open window at
               or below widx - nwin before this one opens. Checked before the transforms, so
               an M3_ENOSPC return leaves sample i untouched for the resume. */
            size_t need = 0;
            for (uint32_t k = 0; k < nwin; k++) {  /* rare: only when windows are skipped */
                int64_t x2 = win_widx(c, cell_win(c, L, k));
                if (x2 != WIDX_NONE && x2 <= widx - (int64_t)nwin) need++;
            }
            if (cap - *nout < need * (size_t)popcount32(c->p.aggmask)) {
                *done = i;
                return M3_ENOSPC;
            }
            uint64_t before = c->emitted;
            finalise_upto(c, L, cell, widx - (int64_t)nwin, out, cap, nout);
            c->evicted += c->emitted - before;
            if (widx - (int64_t)nwin > c->done_widx) c->done_widx = widx - (int64_t)nwin;
        }
        int64_t from = t;
        if (has_pre) {
            if (ordered) {
                if (xh->pre_seen && t <= xh->pre_last_ts) {
                    c->ooo++;
                    continue;
                }
                xh->pre_seen = 1;
                xh->pre_last_ts = t;
            }
            int keep = 1;
            for (int k = 0; k < M3_AGG_MAX_OPS && c->p.pre[k] && keep; k++) {
                /* a rate cell sums increments; its windows divide by their span */
                uint8_t op = c->p.pre[k] == M3_XF_PERSECOND ? M3_XF_INCREASE : c->p.pre[k];
                keep = xf_step(op, &pre[k], t, &x, &from);
            }
            if (!keep) continue;
        }
        uint32_t slot = widx == cur ? cur_slot
                                    : (uint32_t)(((widx % (int64_t)nwin) + nwin) % nwin);
        wword *w = cell_win(c, L, slot);
        if (widx != cur && !win_is(c, w, widx)) {
            if (w[F_LAST_TS].i != WIDX_NONE) {
                /* impossible: an open window in this slot is > widx - nwin and != widx,
                   so it is > widx, and opening it made done_widx >= widx */
                M3_ASSERT(0);
                c->late++;
                continue;
            }
            win_open(c, L, w, slot, widx);
        }
        win_add(c, L, w, slot, t, from, x);
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


static m3_aggcell *cell_at(uint8_t *base, uint64_t stride, uint32_t ncells, uint32_t cell,
                           layout *L)
{
    if (!base || cell >= ncells || stride < sizeof(m3_aggcell) || (stride & 7)) return 0;
    m3_aggcell *c = (m3_aggcell *)(base + (uint64_t)cell * stride);
    /* cheap checks only (this runs per run of samples): init validated the parameters, and
       m3_agg_cell_check re-validates them after a restart */
    if (c->magic != CELL_MAGIC || c->p.nwin < 1 || c->p.nwin > M3_AGG_MAX_WINDOWS ||
        c->p.res_ms <= 0)
        return 0;
    layout_get(&c->p, L);
    if (layout_bytes(L, c->p.nwin) > stride) return 0;
    return c;
}

int m3_agg_apply(uint8_t *base, uint64_t stride, uint32_t ncells, uint32_t cell, uint64_t seq,
                 const int64_t *ts, const double *v, size_t n, int64_t now_ms,
                 m3_agg_out *out, size_t cap, size_t *nout, size_t *done)
{
    layout L;
    m3_aggcell *c = cell_at(base, stride, ncells, cell, &L);
    if (!c || !nout || !done || *nout > cap || (n && (!ts || !v)) || (cap && !out))
        return M3_EINVAL;
    *done = 0;
    if (seq && seq <= c->last_seq) {
        c->dup += n;
        *done = n;
        return M3_OK;
    }
    int rc = apply_cell(c, &L, cell, ts, v, n, clamp_now(now_ms), out, cap, nout, done);
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
        layout L;
        layout_get(&c->p, &L);
        /* windows with (widx + 1) * res + admission <= now are final */
        int64_t upto = floor_div(now_ms - c->p.admission_ms, c->p.res_ms) - 1;
        if (finalise_upto(c, &L, i, upto, out, cap, nout) != M3_OK) {
            *next = i;
            return M3_ENOSPC;
        }
        if (upto > c->done_widx) c->done_widx = upto;
    }
    *next = ncells;
    return M3_OK;
}

/* ---- undo of one apply (csrc/aggstore.c: an owner killed mid-record) ---------------------
   Layout: magic <u32> first slot <u32> slots <u32> pad <u32> | the cell's head (header and
   transform state) | the saved window slots (first, first+1, ... mod nwin) | their sketches
   (if the cell has them). An apply changes only the head, the slots of its samples' windows
   and, when it evicts, the slots of the evicted windows: a record whose windows may evict (or
   span the ring) saves every slot. */
#define UNDO_MAGIC 0x4f444e55u /* "UNDO" */

uint64_t m3_agg_undo_save(const uint8_t *cell, uint64_t cap, const int64_t *ts, size_t n,
                          uint8_t *undo, uint64_t undo_cap)
{
    const m3_aggcell *c = (const m3_aggcell *)cell;
    if (cap < sizeof(m3_aggcell)) return 0;
    const uint64_t nwin = c->p.nwin;
    if (nwin == 0 || nwin > M3_AGG_MAX_WINDOWS || c->p.res_ms <= 0) return 0;
    layout L;
    layout_of(&c->p, &L);
    const uint64_t wb = L.wb, sk = L.sk;
    if (layout_bytes(&L, (uint32_t)nwin) > cap) return 0;
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
    uint64_t need = 16 + L.head + count * (wb + sk);
    if (need > undo_cap)
        return 0;
    uint32_t head[4] = {UNDO_MAGIC, (uint32_t)first, (uint32_t)count, 0};
    memcpy(undo, head, 16);
    uint8_t *o = undo + 16;
    memcpy(o, cell, L.head);
    o += L.head;
    const uint8_t *w0 = cell + L.head, *s0 = w0 + nwin * wb;
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
    m3_aggcell saved;
    memcpy(&saved, undo + 16, sizeof(saved));
    const uint64_t nwin = saved.p.nwin, first = head[1], count = head[2];
    if (head[0] != UNDO_MAGIC || nwin == 0 || nwin > M3_AGG_MAX_WINDOWS || first >= nwin ||
        count > nwin)
        return M3_ECORRUPT;
    layout L;
    layout_of(&saved.p, &L);
    const uint64_t wb = L.wb, sk = L.sk;
    if (layout_bytes(&L, (uint32_t)nwin) > cap || 16 + L.head + count * (wb + sk) > undo_cap)
        return M3_ECORRUPT;
    const uint8_t *o = undo + 16 + L.head;
    uint8_t *w0 = cell + L.head, *s0 = w0 + nwin * wb;
    for (uint64_t i = 0; i < count; i++, o += wb)
        memcpy(w0 + ((first + i) % nwin) * wb, o, wb);
    for (uint64_t i = 0; sk && i < count; i++, o += sk)
        memcpy(s0 + ((first + i) % nwin) * sk, o, sk);
    memcpy(cell, undo + 16, L.head);
    return M3_OK;
}
