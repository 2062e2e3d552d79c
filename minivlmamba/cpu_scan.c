/* The selective scan on a CPU, forward and backward: all of scan.py's selective_scan but the
   delta bias and softplus, in C.

   The PyTorch path runs a dozen elementwise passes a chunk of time steps over (m, b, g, n, dig)
   tensors. Here each call walks blocks of W channels of one (batch row, group) "item", and a
   block's state, h[n][W], stays in the first-level cache from the first step to the last: one
   pass, no tensor of states in memory. Every loop over j (the W channels of a block) is
   vectorised by the compiler: one AVX-512 vector of fp32, two AVX2 ones; the items are shared out
   among OpenMP threads (PyTorch's own, cpu_scan.py says why). The tensors are read where the
   Mamba layer made them, channels last: no copy into another layout, and the skip and the gate
   are applied on the way out. cpu_scan.py compiles this file with the system's C compiler and
   calls it through ctypes.

   Layouts (fp32; item it = bi * g + gi):
       u, delta, out, dout, du, ddelta, dz   (b, l, di) contiguous    delta after bias and softplus
       z                                     (b, l, di), rows sz_b and steps sz_t apart (or NULL)
       B, C                                  (b, l, g, n), rows sbc_b and steps sbc_t apart, each
                                             step's (g, n) contiguous; channel c reads group c / dig
       dB, dC                                (b, l, g, n) contiguous
       A (di, n), D (di) or NULL
       last, dlast, dA (b, di, n), dD (b, di)   dA and dD: batch row bi's share, summed by the caller

   The scan and its gradients (scan.py's _SelectiveScan derives the recurrence's):
       a_t = exp(delta_t A),  h_t = a_t h_{t-1} + delta_t u_t B_t,  y_t = C_t . h_t
       out_t = (y_t + D u_t) silu(z_t),   so dL/dy_t = dout_t silu(z_t) and
       dL/dz_t = dout_t (y_t + D u_t) s(z_t) (1 + z_t (1 - s(z_t))),  s = sigmoid
       g_t = dL/dh_t = dL/dy_t C_t + a_{t+1} g_{t+1}   (g_{l-1} also gets dlast)
       dL/d(delta_t u_t) = g_t . B_t,  dL/dB_t = sum_c g_t delta_t u_t,  dL/dC_t = sum_c dL/dy_t h_t,
       dL/d(delta_t A) = g_t a_t h_{t-1}: summed over n times A into dL/d(delta_t), times delta_t
       over t into dL/dA.                                                                          */

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define W 16
#define LOG2_E 1.44269504088896341f

/* 2^x to within 1e-7 relative: 2^floor(x) made from the exponent bits, times a degree-6 polynomial
   for 2^f on f in [0, 1) (our own least-squares fit). Unlike expf it vectorises. */
static inline float exp2_fast(float x) {
    x = fminf(fmaxf(x, -126.0f), 126.0f);
    int e = (int)(x + 127.0f);  /* the biased exponent of 2^floor(x): x + 127 > 0, so truncation floors */
    float f = x - (float)(e - 127);  /* exact */
    float p = 2.1690609e-4f;
    p = p * f + 1.2443082e-3f;
    p = p * f + 9.6784728e-3f;
    p = p * f + 5.5483524e-2f;
    p = p * f + 2.4022980e-1f;
    p = p * f + 6.9314700e-1f;
    p = p * f + 1.0f;
    union { int i; float f; } scale = { .i = e << 23 };
    return p * scale.f;
}

static inline float sigmoid(float p) { return 1.0f / (1.0f + exp2_fast(-p * LOG2_E)); }

/* The block's w channels (at most W) from src, padded with zeros to W. */
static inline void load(float *out, const float *src, int w) {
    for (int j = 0; j < W; j++) out[j] = j < w ? src[j] : 0.0f;
}

static inline void store(float *dst, const float *v, int w) {
    for (int j = 0; j < w; j++) dst[j] = v[j];
}

/* One block of one item: where its rows start and how far apart its time steps are. */
typedef struct {
    int l, n, w;
    size_t step, bc_step, z_step;  /* elements from t to t + 1: di in u-like tensors, sbc_t, sz_t */
    const float *u, *delta, *B, *C, *z;  /* at t = 0: the block's first channel, the item's B and C */
    float D[W];  /* the block's skip weights (zero without D) */
    float a2[];  /* (n, W): A log2(e), channels innermost, so that a_t = exp2(delta_t a2) */
} Block;

static Block *block_new(int l, int g, int dig, int n, int it, int c0, const float *u, const float *delta,
                        const float *A, const float *B, const float *C, size_t sbc_b, size_t sbc_t,
                        const float *D, const float *z, size_t sz_b, size_t sz_t) {
    int di = g * dig, bi = it / g, end = (it % g + 1) * dig;
    Block *k = malloc(sizeof(Block) + sizeof(float) * n * W);
    k->l = l, k->n = n, k->w = end - c0 < W ? end - c0 : W;
    k->step = di, k->bc_step = sbc_t, k->z_step = sz_t;
    k->u = u + (size_t)bi * l * di + c0, k->delta = delta + (size_t)bi * l * di + c0;
    k->B = B + bi * sbc_b + (size_t)(it % g) * n, k->C = C + bi * sbc_b + (size_t)(it % g) * n;
    k->z = z ? z + bi * sz_b + c0 : NULL;
    for (int j = 0; j < W; j++) k->D[j] = D && j < k->w ? D[c0 + j] : 0.0f;
    for (int s = 0; s < n; s++)
        for (int j = 0; j < W; j++) k->a2[s * W + j] = j < k->w ? A[(size_t)(c0 + j) * n + s] * LOG2_E : 0.0f;
    return k;
}

/* The states h_t of a block from a zero start: y_t (in ys, (l, W)), every h_t and decay a_t (in
   states and decays, if not NULL; (l, n, W) each), and the last state in h (n, W). */
static void run(const Block *k, float *ys, float *states, float *decays, float *h) {
    int n = k->n;
    float dt[W], x[W];
    memset(h, 0, sizeof(float) * n * W);
    for (int t = 0; t < k->l; t++) {
        float *yt = ys + t * W;
        load(dt, k->delta + t * k->step, k->w);
        load(x, k->u + t * k->step, k->w);
        for (int j = 0; j < W; j++) x[j] *= dt[j], yt[j] = 0.0f;  /* x = delta_t u_t */
        const float *Bt = k->B + t * k->bc_step, *Ct = k->C + t * k->bc_step;
        for (int s = 0; s < n; s++) {
            float *hs = h + s * W;
            for (int j = 0; j < W; j++) {
                float a = exp2_fast(dt[j] * k->a2[s * W + j]);
                hs[j] = a * hs[j] + x[j] * Bt[s];
                yt[j] += Ct[s] * hs[j];
                if (decays) decays[((size_t)t * n + s) * W + j] = a;
            }
        }
        if (states) memcpy(states + (size_t)t * n * W, h, sizeof(float) * n * W);
    }
}

/* Every item: out and the last state. */
void scan_forward(int l, int b, int g, int dig, int n, const float *u, const float *delta, const float *A,
                  const float *B, const float *C, int sbc_b, int sbc_t, const float *D, const float *z,
                  int sz_b, int sz_t, float *out, float *last) {
    int di = g * dig;
    #pragma omp parallel
    {
        float *h = malloc(sizeof(float) * n * W), *ys = malloc(sizeof(float) * l * W), uu[W], zt[W];
        #pragma omp for schedule(static)
        for (int it = 0; it < b * g; it++)
            for (int c0 = it % g * dig; c0 < (it % g + 1) * dig; c0 += W) {
                Block *k = block_new(l, g, dig, n, it, c0, u, delta, A, B, C, sbc_b, sbc_t, D, z, sz_b, sz_t);
                size_t first = (size_t)(it / g) * di + c0;  /* the block's first channel in (b, di) */
                float *o = out + (size_t)(it / g) * l * di + c0;
                run(k, ys, NULL, NULL, h);
                for (int t = 0; t < l; t++) {  /* the skip and the gate */
                    float *yt = ys + t * W;
                    load(uu, k->u + t * k->step, k->w);
                    for (int j = 0; j < W; j++) yt[j] += k->D[j] * uu[j];
                    if (z) {
                        load(zt, k->z + t * k->z_step, k->w);
                        for (int j = 0; j < W; j++) yt[j] *= zt[j] * sigmoid(zt[j]);
                    }
                    store(o + (size_t)t * di, yt, k->w);
                }
                for (int j = 0; j < k->w; j++)
                    for (int s = 0; s < n; s++) last[(first + j) * n + s] = h[s * W + j];
                free(k);
            }
        free(h); free(ys);
    }
}
/* Every item: the gradients of u, delta, A and D (this batch row's shares), B, C and z. Each
   block's states, decays and y are recomputed forward, then the recurrence runs backward in time;
   dB and dC are summed over the item's channels lane by lane, and over the lanes at the end. */
void scan_backward(int l, int b, int g, int dig, int n, const float *u, const float *delta, const float *A,
                   const float *B, const float *C, int sbc_b, int sbc_t, const float *D, const float *z,
                   int sz_b, int sz_t, const float *dout, const float *dlast, float *du, float *ddelta,
                   float *dA, float *dB, float *dC, float *dD, float *dz) {
    int di = g * dig;
    size_t nw = (size_t)n * W;
    #pragma omp parallel
    {
        float *h = malloc(sizeof(float) * nw), *gs = malloc(sizeof(float) * nw), *dA_k = malloc(sizeof(float) * nw);
        float *states = malloc(sizeof(float) * l * nw), *decays = malloc(sizeof(float) * l * nw);
        float *dB_lanes = malloc(sizeof(float) * l * nw), *dC_lanes = malloc(sizeof(float) * l * nw);
        float *ys = malloc(sizeof(float) * l * W);
        float dt[W], uu[W], x[W], dyt[W], zt[W], d_x[W], d_dt[W], dD_k[W], zero[W] = {0};
        #pragma omp for schedule(static)
        for (int it = 0; it < b * g; it++) {
            int bi = it / g;
            memset(dB_lanes, 0, sizeof(float) * l * nw);
            memset(dC_lanes, 0, sizeof(float) * l * nw);
            for (int c0 = it % g * dig; c0 < (it % g + 1) * dig; c0 += W) {
                Block *k = block_new(l, g, dig, n, it, c0, u, delta, A, B, C, sbc_b, sbc_t, D, z, sz_b, sz_t);
                size_t first = (size_t)bi * di + c0;  /* the block's first channel in (b, di) */
                size_t row = (size_t)bi * l * di + c0;  /* and in (b, l, di) at t = 0 */
                run(k, ys, states, decays, h);
                for (int s = 0; s < n; s++)
                    for (int j = 0; j < W; j++) gs[s * W + j] = j < k->w ? dlast[(first + j) * n + s] : 0.0f;
                memset(dA_k, 0, sizeof(float) * nw);
                memset(dD_k, 0, sizeof(dD_k));
                for (int t = l - 1; t >= 0; t--) {
                    load(dt, k->delta + t * k->step, k->w);
                    load(uu, k->u + t * k->step, k->w);
                    load(dyt, dout + row + (size_t)t * di, k->w);
                    if (z) {  /* through the gate: dyt becomes dL/d(y_t + D u_t) */
                        load(zt, k->z + t * k->z_step, k->w);
                        float dzt[W];
                        for (int j = 0; j < W; j++) {
                            float sg = sigmoid(zt[j]), pre = ys[t * W + j] + k->D[j] * uu[j];
                            dzt[j] = dyt[j] * pre * sg * (1.0f + zt[j] * (1.0f - sg));
                            dyt[j] *= zt[j] * sg;
                        }
                        store(dz + row + (size_t)t * di, dzt, k->w);
                    }
                    for (int j = 0; j < W; j++) x[j] = dt[j] * uu[j], d_x[j] = 0.0f, d_dt[j] = 0.0f, dD_k[j] += dyt[j] * uu[j];
                    const float *Bt = k->B + t * k->bc_step, *Ct = k->C + t * k->bc_step;
                    const float *ht = states + t * nw, *at = decays + t * nw;
                    const float *hprev = t > 0 ? states + (t - 1) * nw : NULL;
                    float *dBt = dB_lanes + t * nw, *dCt = dC_lanes + t * nw;
                    for (int s = 0; s < n; s++) {
                        const float *a2 = k->a2 + s * W, *hp = hprev ? hprev + s * W : zero;
                        float *g_ = gs + s * W;
                        for (int j = 0; j < W; j++) {
                            float a = at[s * W + j];
                            float gt = g_[j] + dyt[j] * Ct[s];  /* g_t = dy_t C_t + a_{t+1} g_{t+1} */
                            float q = gt * a * hp[j];           /* dL/d(delta_t A) */
                            dCt[s * W + j] += dyt[j] * ht[s * W + j];
                            dBt[s * W + j] += gt * x[j];
                            d_x[j] += gt * Bt[s];
                            d_dt[j] += q * a2[j];               /* times ln 2 below: a2 ln 2 = A */
                            dA_k[s * W + j] += q * dt[j];
                            g_[j] = a * gt;                     /* a_t g_t, carried to t - 1 */
                        }
                    }
                    for (int j = 0; j < W; j++)
                        d_dt[j] = d_dt[j] / LOG2_E + d_x[j] * uu[j], d_x[j] = d_x[j] * dt[j] + dyt[j] * k->D[j];
                    store(du + row + (size_t)t * di, d_x, k->w);
                    store(ddelta + row + (size_t)t * di, d_dt, k->w);
                }
                for (int j = 0; j < k->w; j++)
                    for (int s = 0; s < n; s++) dA[(first + j) * n + s] = dA_k[s * W + j];
                if (dD) store(dD + first, dD_k, k->w);
                free(k);
            }
            for (int t = 0; t < l; t++)  /* (b, l, g, n): item it's (g, n) row at step t */
                for (int s = 0; s < n; s++) {
                    float sb = 0.0f, sc = 0.0f;
                    for (int j = 0; j < W; j++) sb += dB_lanes[t * nw + s * W + j], sc += dC_lanes[t * nw + s * W + j];
                    dB[((size_t)bi * l + t) * g * n + (size_t)(it % g) * n + s] = sb;
                    dC[((size_t)bi * l + t) * g * n + (size_t)(it % g) * n + s] = sc;
                }
        }
        free(h); free(gs); free(dA_k); free(states); free(decays); free(dB_lanes); free(dC_lanes); free(ys);
    }
}

/* The Mamba layer's causal depthwise convolution + SiLU (mamba.py's `causal_conv1d_silu`), forward
   and backward. PyTorch runs it as a padded conv1d, a slice and a SiLU, each a pass over memory and
   the conv's backward a slow generic one; here one pass a direction, vectorised over channels.

   Layouts (fp32): x (b, l, di) with channels contiguous and rows sb, st elements apart (a slice of
   in_proj's output); w (k, di), tap j reading x_{t - (k-1) + j}; bias (di); y, dy, dx (b, l, di)
   contiguous; dw (k, di) and dbias (di) summed over the batch.
       p_t = bias + sum_j w_j x_{t-(k-1)+j},  y_t = p_t s(p_t),  s = sigmoid
       dp_t = dy_t s(p_t) (1 + p_t (1 - s(p_t))),  dx_t = sum_j w_j dp_{t+(k-1)-j},
       dw_j = sum_t dp_t x_{t-(k-1)+j},  dbias = sum_t dp_t                                           */

/* p_t of one batch row's step t into out (di). */
static void conv_step(int t, int di, int k, const float *x, size_t st, const float *w, const float *bias,
                      float *restrict out) {
    for (int c = 0; c < di; c++) out[c] = bias[c];
    for (int j = t < k - 1 ? k - 1 - t : 0; j < k; j++) {
        const float *in = x + (size_t)(t - (k - 1) + j) * st, *wj = w + (size_t)j * di;
        for (int c = 0; c < di; c++) out[c] += wj[c] * in[c];
    }
}

void conv_forward(int b, int l, int di, int k, const float *x, int sb, int st, const float *w,
                  const float *bias, float *y) {
    #pragma omp parallel for schedule(static)
    for (int bi = 0; bi < b; bi++)
        for (int t = 0; t < l; t++) {
            float *out = y + ((size_t)bi * l + t) * di;
            conv_step(t, di, k, x + (size_t)bi * sb, st, w, bias, out);
            for (int c = 0; c < di; c++) out[c] *= sigmoid(out[c]);
        }
}

/* Each thread sums dw and dbias over its batch rows into its own slot of `partial` (a slot no
   thread used stays zero); the slots are then added in order, so the result does not depend on
   which thread finishes first. */
void conv_backward(int b, int l, int di, int k, const float *x, int sb, int st, const float *w,
                   const float *bias, const float *dy, float *dx, float *dw, float *dbias) {
    size_t slot = (size_t)(k + 1) * di;  /* a thread's dw (k, di), then its dbias (di) */
    int slots = omp_get_max_threads();
    float *partial = calloc((size_t)slots * slot, sizeof(float));
    #pragma omp parallel
    {
        float *dp = malloc(sizeof(float) * l * di);  /* one batch row's dp, (l, di) */
        float *dw_t = partial + omp_get_thread_num() * slot, *dbias_t = dw_t + (size_t)k * di;
        #pragma omp for schedule(static)
        for (int bi = 0; bi < b; bi++) {
            const float *xb = x + (size_t)bi * sb, *dyb = dy + (size_t)bi * l * di;
            float *dxb = dx + (size_t)bi * l * di;
            for (int t = 0; t < l; t++) {
                float *restrict p = dp + (size_t)t * di;
                conv_step(t, di, k, xb, st, w, bias, p);
                for (int c = 0; c < di; c++) {
                    float s = sigmoid(p[c]);
                    p[c] = dyb[(size_t)t * di + c] * s * (1.0f + p[c] * (1.0f - s));
                    dbias_t[c] += p[c];
                }
            }
            for (int s = 0; s < l; s++) {  /* x_s feeds p_t for t = s + (k-1) - j */
                float *restrict out = dxb + (size_t)s * di;
                const float *restrict in = xb + (size_t)s * st;
                for (int c = 0; c < di; c++) out[c] = 0.0f;
                for (int j = 0; j < k; j++) {
                    int t = s + (k - 1) - j;
                    if (t >= l) continue;
                    const float *restrict wj = w + (size_t)j * di, *restrict dpt = dp + (size_t)t * di;
                    float *restrict dwj = dw_t + (size_t)j * di;
                    for (int c = 0; c < di; c++) {
                        out[c] += wj[c] * dpt[c];
                        dwj[c] += dpt[c] * in[c];
                    }
                }
            }
        }
        free(dp);
    }
    memset(dw, 0, sizeof(float) * k * di);
    memset(dbias, 0, sizeof(float) * di);
    for (int i = 0; i < slots; i++) {
        const float *dw_t = partial + i * slot, *dbias_t = dw_t + (size_t)k * di;
        for (int c = 0; c < k * di; c++) dw[c] += dw_t[c];
        for (int c = 0; c < di; c++) dbias[c] += dbias_t[c];
    }
    free(partial);
}
