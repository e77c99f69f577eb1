// The CUDA kernels behind `ops::gpu` (built to PTX by build.rs when the `cuda` feature is on).
//
// Tensors are contiguous f32, NCHW, under 2^31 elements (the Rust side checks); P is the number of
// pixels per channel plane (H·W). Per-plane kernels run on a (pixel blocks, channel, image) grid, so
// that no thread divides to find its channel (integer division costs tens of instructions on a GPU);
// flat element-wise kernels use grid-stride loops. Per-channel reductions split the batch over
// several blocks per channel and finish in a second kernel (see `channel_sums`), accumulating in
// double so that E[x²] − E[x]² does not cancel.

#define FOR_EACH(i, n) for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += gridDim.x * blockDim.x)

// Pixel `q` of plane (image `img`, channel `ch`) of a (pixel blocks, C, N) grid; returns from threads
// past the plane's end.
#define PLANE_THREAD(q, p, ch, img) \
    int q = blockIdx.x * blockDim.x + threadIdx.x, ch = blockIdx.y, img = blockIdx.z; \
    if (q >= (p)) return;

// NaN-keeping ReLU (a diverging run must show its NaN, as on the CPU).
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

// round(clamp(v, ±λ)·L/λ)·λ/L, halves away from zero, NaN kept (ops::quant::Grid::apply).
__device__ __forceinline__ float quantize(float v, float scale, float levels) {
    float lambda = fmaxf(scale, 1e-8f);
    float c = v < -lambda ? -lambda : (v > lambda ? lambda : v);
    return roundf(c * (levels / lambda)) * (lambda / levels);
}

// Sum of one double per thread over the block (blockDim.x a multiple of 32, at most 1024); the
// result is valid in thread 0.
__device__ double block_sum(double v) {
    __shared__ double warp_sums[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // warp_sums may still be read by a previous call
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    v = threadIdx.x < (blockDim.x >> 5) ? warp_sums[threadIdx.x] : 0.0;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    return v;
}

// col[(c·k + ky)·k + kx][n][oy·OW + ox] = x[n][c][oy·s − pad + ky][ox·s − pad + kx] (0 outside), the
// input fake-quantized first when `qscale` is not null (the straight-through conv2d_quantized). Rows
// span the whole batch, so that the weight gradient is one GEMM over N·P. Grid: (pixel blocks,
// C·k·k rows, N).
extern "C" __global__ void im2col(const float* x, float* col, int c, int h, int w, int k, int stride, int pad,
                                  int oh, int ow, const float* qscale, float levels) {
    PLANE_THREAD(q, oh * ow, row, img)
    int kx = row % k, ky = (row / k) % k, ch = row / (k * k);
    int oy = q / ow;
    int iy = oy * stride - pad + ky, ix = (q - oy * ow) * stride - pad + kx;
    float v = 0.f;
    if (iy >= 0 && iy < h && ix >= 0 && ix < w) {
        v = x[((img * c + ch) * h + iy) * w + ix];
        if (qscale) v = quantize(v, qscale[0], levels);
    }
    col[(row * gridDim.z + img) * oh * ow + q] = v;
}

// The adjoint of im2col: every input pixel gathers the columns it was copied to (no atomics).
// Grid: (pixel blocks, C, N).
extern "C" __global__ void col2im(const float* col, float* dx, int c, int h, int w, int k, int stride, int pad,
                                  int oh, int ow) {
    PLANE_THREAD(q, h * w, ch, img)
    int iy = q / w, ix = q - iy * w, plane = oh * ow;
    {
        const float* base = col + ((img * c + ch) * k * k) * plane;
        float acc = 0.f;
        for (int ky = 0; ky < k; ky++) {
            int ty = iy + pad - ky;
            if (ty < 0 || ty % stride) continue;
            int oy = ty / stride;
            if (oy >= oh) continue;
            for (int kx = 0; kx < k; kx++) {
                int tx = ix + pad - kx;
                if (tx < 0 || tx % stride) continue;
                int ox = tx / stride;
                if (ox >= ow) continue;
                acc += base[(ky * k + kx) * plane + oy * ow + ox];
            }
        }
        dx[(img * c + ch) * h * w + q] = acc;
    }
}

// NCHW → CNHW: y[c][n][q] = x[n][c][q]. Grid: (pixel blocks, C, N).
extern "C" __global__ void channel_major(const float* x, float* y, int p) {
    PLANE_THREAD(q, p, ch, img)
    y[(ch * gridDim.z + img) * p + q] = x[(img * gridDim.y + ch) * p + q];
}

// Per-channel reductions run on a (G, C) grid: block (b, c) sums images [b·per, (b+1)·per) of channel
// c into partial[(c·G + b)·2 + {0, 1}] (doubles), and `finish_sums` adds each channel's G partials in
// order (deterministic, no atomics). Two launches, but C·G blocks (hundreds) instead of C (16-64).

// Partials (Σx, Σx²) of `channel_sums`.
extern "C" __global__ void channel_sums(const float* x, double* partial, int n, int c, int p, int per) {
    int ch = blockIdx.y, first = blockIdx.x * per, count = min(per, n - first);
    float s = 0.f, ss = 0.f;
    for (int i = threadIdx.x; i < count * p; i += blockDim.x) {
        int img = i / p;
        float v = x[((first + img) * c + ch) * p + (i - img * p)];
        s += v;
        ss += v * v;
    }
    double a = block_sum(s), b = block_sum(ss);
    if (threadIdx.x == 0) {
        partial[(ch * gridDim.x + blockIdx.x) * 2] = a;
        partial[(ch * gridDim.x + blockIdx.x) * 2 + 1] = b;
    }
}

// out[c], out[C + c] from each channel's `groups` partial pairs: with `moments`, the mean and the biased
// variance over `count` values; otherwise the two sums.
extern "C" __global__ void finish_sums(const double* partial, float* out, int c, int groups, double count,
                                       int moments) {
    FOR_EACH(ch, c) {
        double a = 0.0, b = 0.0;
        for (int g = 0; g < groups; g++) {
            a += partial[(ch * groups + g) * 2];
            b += partial[(ch * groups + g) * 2 + 1];
        }
        if (moments) {
            double mean = a / count;
            out[ch] = (float)mean;
            out[c + ch] = (float)fmax(b / count - mean * mean, 0.0);
        } else {
            out[ch] = (float)a;
            out[c + ch] = (float)b;
        }
    }
}

__device__ __forceinline__ float invstd(const float* stats, int c, int ch, float eps) {
    return 1.f / sqrtf(stats[c + ch] + eps);
}

// Training batch norm with batch statistics `stats` ([mean; var]), then a ReLU when `use_relu`.
// Grid: (pixel blocks, C, N).
extern "C" __global__ void bn_forward(const float* x, const float* stats, const float* gamma, const float* beta,
                                      float* y, int p, float eps, int use_relu) {
    PLANE_THREAD(q, p, ch, img)
    int c = gridDim.y, i = (img * c + ch) * p + q;
    float v = (x[i] - stats[ch]) * invstd(stats, c, ch, eps) * gamma[ch] + beta[ch];
    y[i] = use_relu ? relu(v) : v;
}

// Partials (Σ g·x̂ → dγ, Σ g → dβ) of a batch norm's backward on the (G, C) grid above, with g the
// incoming gradient masked by the ReLU (y > 0) when there is one.
extern "C" __global__ void bn_grad_sums(const float* dy, const float* x, const float* y, const float* stats,
                                        double* partial, int n, int c, int p, int per, float eps, int use_relu) {
    int ch = blockIdx.y, first = blockIdx.x * per, count = min(per, n - first);
    float mean = stats[ch], is = invstd(stats, c, ch, eps);
    float sg = 0.f, sgx = 0.f;
    for (int i = threadIdx.x; i < count * p; i += blockDim.x) {
        int img = i / p, at = ((first + img) * c + ch) * p + (i - img * p);
        float g = (!use_relu || y[at] > 0.f) ? dy[at] : 0.f;
        sg += g;
        sgx += g * (x[at] - mean) * is;
    }
    double a = block_sum(sgx), b = block_sum(sg);
    if (threadIdx.x == 0) {
        partial[(ch * gridDim.x + blockIdx.x) * 2] = a;
        partial[(ch * gridDim.x + blockIdx.x) * 2 + 1] = b;
    }
}

// dx = γ·σ⁻¹·(g − dβ/M − x̂·dγ/M), the batch-norm input gradient through the batch statistics.
// Grid: (pixel blocks, C, N).
extern "C" __global__ void bn_input_grad(const float* dy, const float* x, const float* y, const float* stats,
                                         const float* gamma, const float* sums, float* dx, int p, float eps,
                                         int use_relu) {
    PLANE_THREAD(q, p, ch, img)
    int c = gridDim.y, i = (img * c + ch) * p + q;
    float inv_m = 1.f / ((float)gridDim.z * p);
    float is = invstd(stats, c, ch, eps);
    float g = (!use_relu || y[i] > 0.f) ? dy[i] : 0.f;
    float xhat = (x[i] - stats[ch]) * is;
    dx[i] = gamma[ch] * is * (g - sums[c + ch] * inv_m - xhat * sums[ch] * inv_m);
}

// y = x·scale[c] + shift[c]; then relu(y + residual) when `residual` is not null, else relu(y) when
// `use_relu`: the eval epilogue of a convolution (batch norm with running statistics, the join).
// Grid: (pixel blocks, C, N).
extern "C" __global__ void channel_affine(const float* x, const float* scale, const float* shift,
                                          const float* residual, float* y, int p, int use_relu) {
    PLANE_THREAD(q, p, ch, img)
    int i = (img * gridDim.y + ch) * p + q;
    float v = x[i] * scale[ch] + shift[ch];
    if (residual) v = relu(v + residual[i]);
    else if (use_relu) v = relu(v);
    y[i] = v;
}

extern "C" __global__ void add_relu(const float* a, const float* b, float* y, int len) {
    FOR_EACH(i, len) y[i] = relu(a[i] + b[i]);
}

// The ReLU's backward from its output: g where y > 0, else 0.
extern "C" __global__ void relu_grad(const float* y, const float* g, float* out, int len) {
    FOR_EACH(i, len) out[i] = y[i] > 0.f ? g[i] : 0.f;
}

// Fake-quantization with one scale per group of `per_group` consecutive values.
extern "C" __global__ void fake_quant(const float* x, const float* scale, float* y, int len, int per_group,
                                      float levels) {
    FOR_EACH(i, len) y[i] = quantize(x[i], scale[i / per_group], levels);
}

// max|x| (NaN if any value is NaN) of values [b·chunk, (b+1)·chunk) of group g into out[g·G + b], on a
// (G, groups) grid; a second launch over the G partials of each group finishes a large group.
extern "C" __global__ void max_abs(const float* x, float* out, int per_group, int chunk) {
    __shared__ float partial[1024];
    int first = blockIdx.x * chunk, count = min(chunk, per_group - first);
    const float* g = x + (long long)blockIdx.y * per_group + first;
    float m = 0.f;
    for (int i = threadIdx.x; i < count; i += blockDim.x) {
        float v = fabsf(g[i]);
        m = (v > m || v != v) ? v : m;
    }
    partial[threadIdx.x] = m;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            float o = partial[threadIdx.x + s];
            float a = partial[threadIdx.x];
            partial[threadIdx.x] = (o > a || o != o) ? o : a;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.y * gridDim.x + blockIdx.x] = partial[0];
}

// The option-A shortcut: y[n][o][i][j] = x[n][o][i·s][j·s] for o < C, 0 for the appended channels.
// Grid: (pixel blocks, out_c, N).
extern "C" __global__ void subsample(const float* x, float* y, int c, int h, int w, int oh, int ow, int stride) {
    PLANE_THREAD(q, oh * ow, o, img)
    int r = q / ow, j = q - r * ow;
    y[(img * gridDim.y + o) * oh * ow + q] = o < c ? x[((img * c + o) * h + r * stride) * w + j * stride] : 0.f;
}

// Grid: (pixel blocks, C, N).
extern "C" __global__ void subsample_grad(const float* g, float* dx, int h, int w, int out_c, int oh, int ow,
                                          int stride) {
    PLANE_THREAD(q, h * w, ch, img)
    int iy = q / w, ix = q - iy * w;
    dx[(img * gridDim.y + ch) * h * w + q] =
        (ix % stride || iy % stride) ? 0.f : g[((img * out_c + ch) * oh + iy / stride) * ow + ix / stride];
}

// One Adam step in place: m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², then
// θ ← θ·decay − step·m / (√(v/bc2) + ε) (optim::Adam::step, fused into one pass).
extern "C" __global__ void adam(float* theta, float* m, float* v, const float* g, int len, float beta1,
                                float beta2, float step_size, float bc2, float eps, float decay) {
    FOR_EACH(i, len) {
        float gi = g[i];
        float mi = m[i] * beta1 + gi * (1.f - beta1);
        float vi = v[i] * beta2 + gi * gi * (1.f - beta2);
        m[i] = mi;
        v[i] = vi;
        theta[i] = theta[i] * decay - mi / (sqrtf(vi / bc2) + eps) * step_size;
    }
}

// A moving average in place: run ← run·keep + value·take, or run ← value where `restart` and the
// average has not started (is not > 0): batch-norm running statistics and activation scales.
extern "C" __global__ void ema(float* run, const float* value, int len, float keep, float take, int restart) {
    FOR_EACH(i, len) {
        float r = run[i], v = value[i];
        run[i] = (restart && !(r > 0.f)) ? v : r * keep + v * take;
    }
}

// Eval batch norm as a per-channel affine: out[c] = γ/√(var + ε), out[C + c] = β − mean·out[c].
extern "C" __global__ void bn_eval_affine(const float* gamma, const float* beta, const float* mean, const float* var,
                                          float* out, int c, float eps) {
    FOR_EACH(ch, c) {
        float scale = gamma[ch] / sqrtf(var[ch] + eps);
        out[ch] = scale;
        out[c + ch] = beta[ch] - mean[ch] * scale;
    }
}

// Partials (Σ g·x → d scale, Σ g → d shift) of `channel_affine`'s backward on the (G, C) grid of the
// reductions above, g masked by the ReLU (y > 0) when there is one.
extern "C" __global__ void affine_grad_sums(const float* dy, const float* x, const float* y, double* partial, int n,
                                            int c, int p, int per, int use_relu) {
    int ch = blockIdx.y, first = blockIdx.x * per, count = min(per, n - first);
    float sg = 0.f, sgx = 0.f;
    for (int i = threadIdx.x; i < count * p; i += blockDim.x) {
        int img = i / p, at = ((first + img) * c + ch) * p + (i - img * p);
        float g = (!use_relu || y[at] > 0.f) ? dy[at] : 0.f;
        sg += g;
        sgx += g * x[at];
    }
    double a = block_sum(sgx), b = block_sum(sg);
    if (threadIdx.x == 0) {
        partial[(ch * gridDim.x + blockIdx.x) * 2] = a;
        partial[(ch * gridDim.x + blockIdx.x) * 2 + 1] = b;
    }
}

// dx = g·scale[c], g masked by the ReLU (y > 0) when there is one. Grid: (pixel blocks, C, N).
extern "C" __global__ void affine_input_grad(const float* dy, const float* y, const float* scale, float* dx, int p,
                                             int use_relu) {
    PLANE_THREAD(q, p, ch, img)
    int i = (img * gridDim.y + ch) * p + q;
    dx[i] = (!use_relu || y[i] > 0.f) ? dy[i] * scale[ch] : 0.f;
}

// The input gradient of [mean; var] over (N, P): dx = d_mean/M + d_var·2(x − mean)/M, from the
// upstream gradient `grad` ([d mean; d var], 2·C) and the statistics `stats`. Grid: (pixel blocks, C, N).
extern "C" __global__ void moments_grad(const float* x, const float* stats, const float* grad, float* dx, int p) {
    PLANE_THREAD(q, p, ch, img)
    int c = gridDim.y, i = (img * c + ch) * p + q;
    float inv_m = 1.f / ((float)gridDim.z * p);
    dx[i] = grad[ch] * inv_m + grad[c + ch] * 2.f * (x[i] - stats[ch]) * inv_m;
}

// Direct convolution for eval, with its epilogue (x·scale[o] + shift[o], then relu(· + residual) with
// a residual, else a ReLU when `use_relu`) and the input fake-quantized on the way when `qscale` is not
// null: one kernel per layer, no im2col matrix. Block: a th×tw tile of output pixels of one image (one
// thread each) and CONV_OT output channels; grid: (tiles, ceil(O / CONV_OT), N). Input channels go
// through shared memory CONV_CC at a time: the input tile with its halo, and the weights laid out
// [channel][ky][kx][output channel] so that each thread reads four weights per 16-byte broadcast load.
#define CONV_OT 16
#define CONV_CC 8
extern "C" __global__ void conv_eval(const float* x, const float* w, const float* scale, const float* shift,
                                     const float* residual, float* y, int c, int h, int wd, int o, int k,
                                     int stride, int pad, int oh, int ow, int tw, int th, const float* qscale,
                                     float levels, int use_relu) {
    extern __shared__ float4 smem4[];
    float* xs = (float*)smem4;
    int ih = (th - 1) * stride + k, iw = (tw - 1) * stride + k;
    float* ws = xs + CONV_CC * ih * iw;  // a multiple of 4 floats: CONV_CC is 8
    int tiles_x = (ow + tw - 1) / tw;
    int tx0 = (blockIdx.x % tiles_x) * tw, ty0 = (blockIdx.x / tiles_x) * th;
    int o0 = blockIdx.y * CONV_OT, img = blockIdx.z;
    int lx = threadIdx.x % tw, ly = threadIdx.x / tw;
    int ox = tx0 + lx, oy = ty0 + ly;
    float acc[CONV_OT];
#pragma unroll
    for (int t = 0; t < CONV_OT; t++) acc[t] = 0.f;
    float qs = qscale ? qscale[0] : 0.f;
    for (int c0 = 0; c0 < c; c0 += CONV_CC) {
        int chunk = min(CONV_CC, c - c0);
        __syncthreads();  // the previous chunk is no longer read
        for (int i = threadIdx.x; i < chunk * ih * iw; i += blockDim.x) {
            int cc = i / (ih * iw), r = i - cc * ih * iw, yy = r / iw, xx = r - yy * iw;
            int gy = ty0 * stride - pad + yy, gx = tx0 * stride - pad + xx;
            float v = 0.f;
            if (gy >= 0 && gy < h && gx >= 0 && gx < wd) {
                v = x[(((long long)img * c + c0 + cc) * h + gy) * wd + gx];
                if (qscale) v = quantize(v, qs, levels);
            }
            xs[i] = v;
        }
        for (int i = threadIdx.x; i < chunk * k * k * CONV_OT; i += blockDim.x) {
            int ot = i % CONV_OT, r = i / CONV_OT, cc = r / (k * k), kk = r - cc * k * k;
            ws[i] = o0 + ot < o ? w[((o0 + ot) * c + c0 + cc) * k * k + kk] : 0.f;
        }
        __syncthreads();
        if (ox < ow && oy < oh) {
            for (int cc = 0; cc < chunk; cc++)
                for (int ky = 0; ky < k; ky++)
                    for (int kx = 0; kx < k; kx++) {
                        float xv = xs[(cc * ih + ly * stride + ky) * iw + lx * stride + kx];
                        const float4* wv = (const float4*)(ws + ((cc * k + ky) * k + kx) * CONV_OT);
#pragma unroll
                        for (int q = 0; q < CONV_OT / 4; q++) {
                            float4 v4 = wv[q];
                            acc[4 * q] += xv * v4.x;
                            acc[4 * q + 1] += xv * v4.y;
                            acc[4 * q + 2] += xv * v4.z;
                            acc[4 * q + 3] += xv * v4.w;
                        }
                    }
        }
    }
    if (ox >= ow || oy >= oh) return;
#pragma unroll
    for (int t = 0; t < CONV_OT; t++) {
        int oc = o0 + t;
        if (oc >= o) break;
        long long i = (((long long)img * o + oc) * oh + oy) * ow + ox;
        float v = acc[t] * scale[oc] + shift[oc];
        if (residual) v = relu(v + residual[i]);
        else if (use_relu) v = relu(v);
        y[i] = v;
    }
}
