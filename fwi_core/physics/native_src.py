"""The C++ source of the native CPU kernels (:mod:`.native` compiles and loads it).

One job is one shot of one sample; a pool of ``threads`` workers takes jobs from a shared
counter, so every shot of every sample of a batch runs in one parallel loop, and each job
runs all of its time steps in a working set that fits a core's L2 cache:

* the two wavefields as halo buffers (``(H+4) x (W+4)``, the periodic wrap of the host's
  ``torch.roll`` refreshed by copies each step, as :func:`.stencil.fill_halo` does);
* the coefficients in compact form instead of three full planes: ``alpha`` as one row per
  row of the unpadded map (``alpha_rows``, the replicate-padded columns included; the pad's
  rows repeat the edge rows, ``row_of`` says which), and ``kappa`` as its two 1-D profiles
  (``kx`` in the x-pad columns, ``kz`` in the columns between, zero in the model's rows).
  ``temp1 = 2 + (-5 alpha) - kappa`` and ``-temp2 = -(1 - kappa)`` are recomputed per cell
  in the host's float32 order of operations (built with ``-ffp-contract=off``: no fused
  multiply-adds), so a step gives the bits that :func:`.stencil.step_fused` gives.

Cells still exactly zero are skipped: each buffer keeps, per row, the columns that may be
non-zero; a step computes a row over the union of its own range and its neighbours' (two
rows up and down, widened by two columns; a range reaching an edge wraps to the full row),
then trims zeros from both ends. A skipped cell would have come out exactly zero, so the
skipping is exact (early steps touch a few percent of the 310 x 310 grid).

The backward recomputes each checkpointed segment and stores, instead of the fields,
``z_t = L'(p_{t-1}) - 5 p_{t-1}`` (the derivative of a step by ``alpha``, through ``temp1``
too), packed row by row over the columns the step computed, so that the adjoint pass needs
one stencil (its own) per cell and step and reads z only where both fields may be non-zero.
The gradient is summed per ``alpha_rows`` cell in float32 within a segment and in double
across segments. See :mod:`.adjoint` for the adjoint's algebra (``r = alpha * q``
propagates with the forward step itself). The checkpoints and each worker's z segment ask
for transparent huge pages before their first write (``madvise``; one fault per 2 MB instead
of per 4 kB page: the faults were a sixth of the forward's time when it keeps checkpoints).
The pool's threads never wait on each other
within a call (no barrier per step), so a loaded machine slows the kernel in proportion
rather than stalling it at every step as spinning OpenMP barriers do.
"""

SOURCE = r"""
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>
#if defined(__SSE2__)
#include <xmmintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

typedef std::ptrdiff_t idx;

struct Scheme {
  int H, W;                // padded grid: rows, columns
  idx ld;                  // row stride of a halo buffer (W + 4)
  const float* arows;      // (R, W) alpha rows of this sample
  const int32_t* row_of;   // (H,) the alpha row of each grid row
  const float* kx;         // (W,) kappa in the columns j < x0 or j >= x1
  const float* kz;         // (H,) kappa in the columns x0 <= j < x1
  int x0, x1;
  float c2, c3;
};

// per row, the columns that may be non-zero: lo..hi (empty when lo > hi)
struct Rows {
  std::vector<int32_t> lo, hi;
  void reset(int H, int W) { lo.assign(H, W); hi.assign(H, -1); }
};

struct Csr {  // the calling thread's floating-point mode, restored on exit
#if defined(__SSE2__)
  unsigned int saved;
  explicit Csr(bool flush) : saved(_mm_getcsr()) { if (flush) _mm_setcsr(saved | 0x8040u); }
  ~Csr() { _mm_setcsr(saved); }
#else
  explicit Csr(bool) {}
#endif
};

void fill_halo(float* b, int H, int W, idx ld) {
  std::memcpy(b + 2, b + H * ld + 2, sizeof(float) * W);
  std::memcpy(b + ld + 2, b + (H + 1) * ld + 2, sizeof(float) * W);
  std::memcpy(b + (H + 2) * ld + 2, b + 2 * ld + 2, sizeof(float) * W);
  std::memcpy(b + (H + 3) * ld + 2, b + 3 * ld + 2, sizeof(float) * W);
  for (int r = 0; r < H + 4; ++r) {
    float* row = b + r * ld;
    row[0] = row[W];
    row[1] = row[W + 1];
    row[W + 2] = row[2];
    row[W + 3] = row[3];
  }
}

// one row's cells j0..j1: o = p_{t-2} -> p_t from c = p_{t-1}; with ZOUT, z = L'(p_{t-1}) - 5 p_{t-1}
template <bool KARR, bool ZOUT>
inline void span(float* __restrict o, const float* __restrict c, idx ld, const float* __restrict al,
                 const float* __restrict kx, float ks, int j0, int j1, float c2, float c3, float* __restrict z) {
  for (int j = j0; j <= j1; ++j) {
    const float a = al[j];
    const float k = KARR ? kx[j] : ks;
    const float t1 = (2.0f + (-5.0f * a)) - k;
    const float nt2 = -(1.0f - k);
    const float* q = c + j;
    const float s1 = ((q[1] + q[-1]) + q[ld]) + q[-ld];
    const float s2 = ((q[2] + q[-2]) + q[2 * ld]) + q[-2 * ld];
    const float l = c2 * s1 + c3 * s2;
    o[j] = (nt2 * o[j] + t1 * q[0]) + a * l;
    if (ZOUT) z[j] = l + (-5.0f) * q[0];
  }
}

template <bool ZOUT>
inline void row3(const Scheme& s, int i, float* o, const float* c, const float* al, int lo, int hi, float* z) {
  const int a1 = std::min(hi, s.x0 - 1);
  if (lo <= a1) span<true, ZOUT>(o, c, s.ld, al, s.kx, 0.0f, lo, a1, s.c2, s.c3, z);
  const int b0 = std::max(lo, s.x0), b1 = std::min(hi, s.x1 - 1);
  if (b0 <= b1) span<false, ZOUT>(o, c, s.ld, al, s.kx, s.kz[i], b0, b1, s.c2, s.c3, z);
  const int e0 = std::max(lo, s.x1);
  if (e0 <= hi) span<true, ZOUT>(o, c, s.ld, al, s.kx, 0.0f, e0, hi, s.c2, s.c3, z);
}

// z of one step, packed: row i holds columns lo[i]..hi[i] at data[off[i] + j]
struct Packed {
  float* data;
  int32_t* lo;
  int32_t* hi;
  idx* off;
};

inline void accumulate(float* __restrict acc, const float* __restrict o, const float* __restrict z, int j0, int j1) {
  for (int j = j0; j <= j1; ++j) acc[j] += o[j] * z[j];
}

// P (p_{t-2}, rows rp) becomes p_t from C (p_{t-1}, halo filled, rows rc). With ZOUT, zp gets
// z = L'(p_{t-1}) - 5 p_{t-1} on the computed cells (zero elsewhere), packed from *cursor on.
// With ACC (the adjoint), acc (R x W) += p_t * z of zp on every row but skip_row (done by the
// caller after it adds the receivers' term there).
template <bool ZOUT, bool ACC>
void step(const Scheme& s, float* P, const float* C, Rows& rp, const Rows& rc, Packed zp, idx* cursor,
          float* acc, int skip_row) {
  const int H = s.H, W = s.W;
  const idx ld = s.ld;
  for (int i = 0; i < H; ++i) {
    int lo = rp.lo[i], hi = rp.hi[i];
    for (int d = -2; d <= 2; ++d) {
      int r = i + d;
      r = r < 0 ? r + H : (r >= H ? r - H : r);
      if (rc.lo[r] <= rc.hi[r]) {
        lo = std::min(lo, rc.lo[r] - 2);
        hi = std::max(hi, rc.hi[r] + 2);
      }
    }
    if (lo <= hi && (lo < 0 || hi >= W)) { lo = 0; hi = W - 1; }  // the wrap reaches the far side
    float* zr = nullptr;
    if (ZOUT) {
      zp.lo[i] = lo;
      zp.hi[i] = hi;
      zp.off[i] = *cursor - lo;
      zr = zp.data + zp.off[i];
      if (lo <= hi) *cursor += hi - lo + 1;
    }
    if (lo > hi) continue;
    float* o = P + (i + 2) * ld + 2;
    const float* c = C + (i + 2) * ld + 2;
    row3<ZOUT>(s, i, o, c, s.arows + (idx)s.row_of[i] * W, lo, hi, zr);
    if (ACC && i != skip_row) {
      const int a = std::max(lo, zp.lo[i]), b = std::min(hi, zp.hi[i]);
      if (a <= b) accumulate(acc + (idx)s.row_of[i] * W, o, zp.data + zp.off[i], a, b);
    }
    while (lo <= hi && o[lo] == 0.0f) ++lo;
    while (hi >= lo && o[hi] == 0.0f) --hi;
    rp.lo[i] = lo;
    rp.hi[i] = hi;
  }
}

inline void add_at(float* B, idx ld, Rows& r, int row, int col, float v) {
  if (v == 0.0f) return;
  B[(row + 2) * ld + col + 2] += v;
  r.lo[row] = std::min(r.lo[row], (int32_t)col);
  r.hi[row] = std::max(r.hi[row], (int32_t)col);
}

// asks for transparent huge pages on a large buffer about to be written for the first time
// (the checkpoints, a segment's z): one fault per 2 MB instead of per 4 kB page
void huge_pages(void* p, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const std::uintptr_t a = ((std::uintptr_t)p + 0x1FFFFF) & ~(std::uintptr_t)0x1FFFFF;
  const std::uintptr_t e = ((std::uintptr_t)p + bytes) & ~(std::uintptr_t)0x1FFFFF;
  if (e > a) madvise((void*)a, e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// interior of a halo buffer <-> a dense H x W field
void save(const float* B, float* dst, int H, int W, idx ld) {
  for (int i = 0; i < H; ++i) std::memcpy(dst + (idx)i * W, B + (i + 2) * ld + 2, sizeof(float) * W);
}

void load(float* B, const float* src, int H, int W, idx ld, Rows& r) {
  for (int i = 0; i < H; ++i) {
    float* row = B + (i + 2) * ld + 2;
    std::memcpy(row, src + (idx)i * W, sizeof(float) * W);
    int lo = 0, hi = W - 1;
    while (lo <= hi && row[lo] == 0.0f) ++lo;
    while (hi >= lo && row[hi] == 0.0f) --hi;
    r.lo[i] = lo;
    r.hi[i] = hi;
  }
}

// runs job(worker_index, job_index) for every job on `threads` workers (the caller is one);
// returns false if a worker ran out of memory
template <class Job>
bool parallel_jobs(int njobs, int threads, bool flush, Job job) {
  std::atomic<int> next(0);
  std::atomic<bool> failed(false);
  auto worker = [&](int w) {
    Csr csr(flush);
    try {
      for (;;) {
        const int j = next.fetch_add(1);
        if (j >= njobs || failed.load()) break;
        job(w, j);
      }
    } catch (const std::bad_alloc&) {
      failed.store(true);
    }
  };
  threads = std::max(1, std::min(threads, njobs));
  std::vector<std::thread> pool;
  for (int w = 1; w < threads; ++w) pool.emplace_back(worker, w);
  worker(0);
  for (auto& t : pool) t.join();
  return !failed.load();
}

struct Problem {
  int S, n, H, W, R, nt, x0, x1, sz, rz, nr;
  float c2, c3;
  const float* arows;
  const int32_t* row_of;
  const float* kx;
  const float* kz;
  const float* amp;
  const int32_t* src_col;
  const float* wav;
  const int32_t* rec_col;
  Scheme scheme(int b) const {
    return Scheme{H, W, (idx)W + 4, arows + (idx)b * R * W, row_of, kx + (idx)b * W, kz + (idx)b * H, x0, x1, c2, c3};
  }
};

}  // namespace

extern "C" {

int fwi_native_version() { return 1; }

// out: (S, n, nt, nr); ckpt (S, n, nck, 2, H, W) or null: before step it = (j+1)*k, the
// fields p_{it-1} and p_{it-2}.
int fwi_forward(int S, int n, int H, int W, int R, int nt, const float* arows, const int32_t* row_of,
                const float* kx, const float* kz, int x0, int x1, float c2, float c3, const float* amp,
                const int32_t* src_col, int sz, const float* wav, int rz, const int32_t* rec_col, int nr,
                float* out, float* ckpt, int k, int threads, int flush) {
  const Problem p{S, n, H, W, R, nt, x0, x1, sz, rz, nr, c2, c3, arows, row_of, kx, kz, amp, src_col, wav, rec_col};
  const idx ld = W + 4, size = (idx)(H + 4) * ld, field = (idx)H * W;
  const int nck = ckpt ? (nt + k - 1) / k - 1 : 0;
  std::vector<std::vector<float>> bufs(threads);
  std::vector<Rows> rows(2 * threads);
  if (ckpt) huge_pages(ckpt, sizeof(float) * (std::size_t)S * n * nck * 2 * field);
  const bool ok = parallel_jobs(S * n, threads, flush != 0, [&](int w, int job) {
    const int b = job / n, s = job % n;
    const Scheme sc = p.scheme(b);
    std::vector<float>& buf = bufs[w];
    buf.assign(2 * size, 0.0f);
    float* P = buf.data();
    float* C = P + size;
    Rows* rp = &rows[2 * w];
    Rows* rc = &rows[2 * w + 1];
    rp->reset(H, W);
    rc->reset(H, W);
    const float a = amp[(idx)b * n + s];
    float* rec = out + ((idx)b * n + s) * nt * nr;
    float* ck = ckpt ? ckpt + ((idx)b * n + s) * nck * 2 * field : nullptr;
    for (int it = 0; it < nt; ++it) {
      if (ck && it > 0 && it % k == 0) {
        float* dst = ck + (idx)(it / k - 1) * 2 * field;
        save(C, dst, H, W, ld);
        save(P, dst + field, H, W, ld);
      }
      fill_halo(C, H, W, ld);
      step<false, false>(sc, P, C, *rp, *rc, Packed{}, nullptr, nullptr, -1);
      add_at(P, ld, *rp, sz, src_col[s], wav[it] * a);
      const float* row = P + (rz + 2) * ld + 2;
      for (int m = 0; m < nr; ++m) rec[(idx)it * nr + m] = row[rec_col[m]];
      std::swap(P, C);
      std::swap(rp, rc);
    }
  });
  return ok ? 0 : 1;
}

// grad: (S, n, nt, nr) gradient of the traces; g_rows: (S, n, R, W) gradient of alpha_rows
// per shot (through temp1 as well); g_amp: (S, n) gradient of the source amplitudes.
int fwi_backward(int S, int n, int H, int W, int R, int nt, const float* arows, const int32_t* row_of,
                 const float* kx, const float* kz, int x0, int x1, float c2, float c3, const float* amp,
                 const int32_t* src_col, int sz, const float* wav, int src_steps, int rz,
                 const int32_t* rec_col, int nr, const float* grad, const float* ckpt, int k,
                 float* g_rows, float* g_amp, int threads, int flush) {
  const Problem p{S, n, H, W, R, nt, x0, x1, sz, rz, nr, c2, c3, arows, row_of, kx, kz, amp, src_col, wav, rec_col};
  const idx ld = W + 4, size = (idx)(H + 4) * ld, field = (idx)H * W;
  const int nseg = (nt + k - 1) / k, nck = nseg - 1;
  struct Work {
    std::vector<float> buf, acc;
    std::unique_ptr<float[]> z;  // one segment's z, not zero-filled (each step writes what it reads)
    idx zsize = 0;
    std::vector<int32_t> zlo, zhi;
    std::vector<idx> zoff;
    std::vector<double> total;
    std::vector<float> al_rec;
    Rows r[4];
  };
  std::vector<Work> work(threads);
  const int kk = std::min(k, nt);
  const bool ok = parallel_jobs(S * n, threads, flush != 0, [&](int w, int job) {
    const int b = job / n, s = job % n;
    const Scheme sc = p.scheme(b);
    Work& wk = work[w];
    wk.buf.assign(4 * size, 0.0f);
    if (wk.zsize < (idx)kk * field) {
      wk.zsize = (idx)kk * field;
      wk.z.reset(new float[wk.zsize]);
      huge_pages(wk.z.get(), sizeof(float) * (std::size_t)wk.zsize);
    }
    wk.zlo.resize((idx)kk * H);
    wk.zhi.resize((idx)kk * H);
    wk.zoff.resize((idx)kk * H);
    wk.acc.assign((idx)R * W, 0.0f);
    wk.total.assign((idx)R * W, 0.0);
    float* P = wk.buf.data();
    float* C = P + size;
    float* Qp = C + size;
    float* Qc = Qp + size;
    Rows* rp = &wk.r[0];
    Rows* rc = &wk.r[1];
    Rows* qp = &wk.r[2];
    Rows* qc = &wk.r[3];
    for (Rows& r : wk.r) r.reset(H, W);
    const float* ar = sc.arows;
    wk.al_rec.resize(nr);
    for (int m = 0; m < nr; ++m) wk.al_rec[m] = ar[(idx)row_of[rz] * W + rec_col[m]];
    const float a = amp[(idx)b * n + s];
    const float* g = grad + ((idx)b * n + s) * nt * nr;
    const float* ck = ckpt + ((idx)b * n + s) * nck * 2 * field;
    const int sc_col = src_col[s];
    float* acc = wk.acc.data();
    float* acc_rz = acc + (idx)row_of[rz] * W;
    float r_src = 0.0f;
    for (int j = nseg - 1; j >= 0; --j) {
      const int t0 = j * k, t_end = std::min(nt, t0 + k);
      if (j == 0) {
        std::fill(P, P + size, 0.0f);
        std::fill(C, C + size, 0.0f);
        rp->reset(H, W);
        rc->reset(H, W);
      } else {
        load(C, ck + (idx)(j - 1) * 2 * field, H, W, ld, *rc);
        load(P, ck + (idx)(j - 1) * 2 * field + field, H, W, ld, *rp);
      }
      idx cursor = 0;
      for (int t = t0; t < t_end; ++t) {
        const idx i = t - t0;
        fill_halo(C, H, W, ld);
        const Packed zp{wk.z.get(), wk.zlo.data() + i * H, wk.zhi.data() + i * H, wk.zoff.data() + i * H};
        step<true, false>(sc, P, C, *rp, *rc, zp, &cursor, nullptr, -1);
        add_at(P, ld, *rp, sz, sc_col, wav[t] * a);
        std::swap(P, C);
        std::swap(rp, rc);
      }
      for (int t = t_end - 1; t >= t0; --t) {
        const idx i = t - t0;
        const Packed zp{wk.z.get(), wk.zlo.data() + i * H, wk.zhi.data() + i * H, wk.zoff.data() + i * H};
        fill_halo(Qc, H, W, ld);
        step<false, true>(sc, Qp, Qc, *qp, *qc, zp, nullptr, acc, rz);
        for (int m = 0; m < nr; ++m) add_at(Qp, ld, *qp, rz, rec_col[m], g[(idx)t * nr + m] * wk.al_rec[m]);
        const int lo = std::max(qp->lo[rz], zp.lo[rz]), hi = std::min(qp->hi[rz], zp.hi[rz]);
        if (lo <= hi) accumulate(acc_rz, Qp + (rz + 2) * ld + 2, zp.data + zp.off[rz], lo, hi);
        if (t < src_steps) r_src += wav[t] * Qp[(sz + 2) * ld + sc_col + 2];
        std::swap(Qp, Qc);
        std::swap(qp, qc);
      }
      // a segment's float sums (at most k steps x the rows sharing an alpha row) go to double
      for (idx c = 0; c < (idx)R * W; ++c) {
        wk.total[c] += acc[c];
        acc[c] = 0.0f;
      }
    }
    float* gr = g_rows + ((idx)b * n + s) * R * W;
    for (idx c = 0; c < (idx)R * W; ++c) gr[c] = (float)(wk.total[c] / (double)ar[c]);
    g_amp[(idx)b * n + s] = r_src / ar[(idx)row_of[sz] * W + sc_col];
  });
  return ok ? 0 : 1;
}

}  // extern "C"
"""
