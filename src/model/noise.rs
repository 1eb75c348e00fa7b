//! torch's CPU random generator, reproduced bit for bit.
//!
//! Why: a user who types `--seed 42` expects the image a diffusers script
//! gives for `generator=torch.Generator().manual_seed(42)`, and the image is
//! decided by the initial latent `torch.randn(shape, generator=g)` (and, for
//! the ancestral samplers, by the noise each step draws from the same
//! generator). So [`TorchRng`] is torch's generator, not "a" normal generator:
//!
//! * the engine is a 32-bit Mersenne Twister seeded the way torch's
//!   `CPUGeneratorImpl` seeds it, from the **low 32 bits** of the seed (so
//!   `2**32 + 5` draws what `5` draws);
//! * a uniform `float` is the low 24 bits of one 32-bit draw times 2⁻²⁴; a
//!   uniform `double` is the low 53 bits of two draws (first one high) times
//!   2⁻⁵³;
//! * `randn` of **16 or more** values fills all of them with uniforms, turns
//!   each block of 16 into normals by Box–Muller (first 8 are `u1`, last 8
//!   `u2`), and when the count is not a multiple of 16 draws 16 fresh
//!   uniforms for the last 16 places and redoes that block;
//! * `randn` of **fewer than 16** values draws one double-precision
//!   Box–Muller pair per two values, keeping the sine half in the generator
//!   for the next such draw, even across calls (a `manual_seed` forgets it).
//!
//! torch's float Box–Muller for 16 or more values is not the same code on
//! every machine, and neither are its results: its AVX2 and AVX-512 builds
//! (what every x86-64 CPU of the last decade runs) use the Cephes-derived
//! `log`/`sincos` polynomials of its `avx_mathfun.h`, compiled with fused
//! multiply-adds; its DEFAULT build (no AVX2, or `ATEN_CPU_CAPABILITY=default`)
//! calls the C library's `logf`/`cosf`/`sinf`. The two differ in the last bit
//! of about 40 % of the values. [`NormalKernel`] picks one; the default is
//! the vectorised one, and it is plain IEEE arithmetic here (with a fused
//! multiply-add of its own, not the C library's), so spm gives the same
//! values on every platform. The scalar kernel calls the platform's
//! `logf`/`cosf`/`sinf`, as torch's DEFAULT build does, so it matches torch
//! built on the same C library (checked on glibc). The fewer-than-16 path
//! calls the platform's double `log1p`/`sin`/`cos` as torch does; its
//! results are rounded to float, which hides their last-bit differences
//! (glibc and MinGW give the same draws on the fixtures).

/// Which of torch's float Box–Muller kernels (used when 16 or more values are
/// drawn at once) to reproduce.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NormalKernel {
    /// torch's AVX2 / AVX-512 builds: `avx_mathfun.h` polynomials with the
    /// multiply-adds GCC fuses. What torch gives on any x86-64 CPU with AVX2.
    #[default]
    Vectorized,
    /// torch's DEFAULT build: the C library's `logf`, `cosf`, `sinf`.
    Scalar,
}

/// The 32-bit Mersenne Twister (MT19937) as torch's `at::mt19937` runs it.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        for i in 0..624 {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % 624] & LOWER);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            self.state[i] = self.state[(i + 397) % 624] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// torch's CPU generator (`torch.Generator()`), for `randn` and `rand` in
/// `float32`.
///
/// ```
/// use spm::model::noise::TorchRng;
/// // torch.randn(3, generator=torch.Generator().manual_seed(0))
/// let x = TorchRng::manual_seed(0).randn(3);
/// assert_eq!(x, [1.5409961f32, -0.29342890, -2.1787894]);
/// ```
#[derive(Clone)]
pub struct TorchRng {
    seed: u64,
    engine: Mt19937,
    /// The second half of the last double Box–Muller pair, if unused.
    next_double_normal: Option<f64>,
    kernel: NormalKernel,
}

impl std::fmt::Debug for TorchRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchRng")
            .field("seed", &self.seed)
            .field("kernel", &self.kernel)
            .finish_non_exhaustive()
    }
}

impl TorchRng {
    /// `torch.Generator().manual_seed(seed)`. Only the low 32 bits seed the
    /// engine, as in torch.
    pub fn manual_seed(seed: u64) -> Self {
        TorchRng {
            seed,
            engine: Mt19937::new(seed as u32),
            next_double_normal: None,
            kernel: NormalKernel::default(),
        }
    }

    /// The same generator, reproducing another of torch's float kernels.
    pub fn with_kernel(mut self, kernel: NormalKernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// The seed given to [`manual_seed`](Self::manual_seed)
    /// (`Generator.initial_seed()`).
    pub fn initial_seed(&self) -> u64 {
        self.seed
    }

    /// The float kernel in use.
    pub fn kernel(&self) -> NormalKernel {
        self.kernel
    }

    fn uniform_f32(&mut self) -> f32 {
        // The low 24 bits (float's digits) of one draw, scaled into [0, 1).
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    fn uniform_f64(&mut self) -> f64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// One double-precision normal, torch's `at::normal_distribution<double>`.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.rand(n, generator=g)` (float32), flattened.
    pub fn rand(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform_f32()).collect()
    }

    /// `torch.randn(shape, generator=g, dtype=torch.float32)` flattened, where
    /// `n` is the number of elements of `shape`. Successive calls continue
    /// the stream as successive `torch.randn` calls on one generator do.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        let mut i = 0;
        while i + 16 <= n {
            self.box_muller_16(&mut data[i..i + 16]);
            i += 16;
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            self.box_muller_16(tail);
        }
        data
    }

    /// Turns 16 uniforms into 16 normals: `u1 = 1 - block[j]` (so the log
    /// never sees 0), `u2 = block[j + 8]`, cosine half first.
    fn box_muller_16(&self, block: &mut [f32]) {
        for j in 0..8 {
            let u1 = 1.0 - block[j];
            let u2 = block[j + 8];
            let (cos, sin) = match self.kernel {
                NormalKernel::Vectorized => {
                    let radius = (-2.0 * cephes::log(u1)).sqrt();
                    let theta = (2.0 * std::f64::consts::PI) as f32 * u2;
                    let (s, c) = cephes::sincos(theta);
                    (radius * c, radius * s)
                }
                NormalKernel::Scalar => {
                    let radius = (-2.0 * u1.ln()).sqrt();
                    let theta = (2.0 * std::f64::consts::PI * u2 as f64) as f32;
                    (radius * theta.cos(), radius * theta.sin())
                }
            };
            // `x * std + mean` with std 1 and mean 0: only turns -0 into +0.
            block[j] = cos + 0.0;
            block[j + 8] = sin + 0.0;
        }
    }
}

/// `a * b + c` with one rounding (a fused multiply-add), in plain `f64`
/// arithmetic, so that it is the same on every platform: `f32::mul_add`
/// calls the C library's `fmaf` on CPUs built without FMA, and MinGW's is
/// not correctly rounded. The product of two floats is exact in a double;
/// the sum is rounded to odd (Boldo & Melquiond 2008), after which rounding
/// to float is the correct rounding of the exact result.
pub(crate) fn fused_mul_add(a: f32, b: f32, c: f32) -> f32 {
    let p = a as f64 * b as f64;
    let c = c as f64;
    let s = p + c;
    if !s.is_finite() {
        return s as f32;
    }
    // The exact rounding error of the sum (Knuth's TwoSum).
    let bb = s - p;
    let err = (p - (s - bb)) + (c - bb);
    let mut bits = s.to_bits();
    if err != 0.0 && bits & 1 == 0 {
        // Round to odd: step to the odd neighbour on the side of the error.
        if (err > 0.0) == (s > 0.0) {
            bits += 1;
        } else {
            bits -= 1;
        }
    }
    f64::from_bits(bits) as f32
}

/// The single-precision `log` and `sincos` of torch's `avx_mathfun.h`
/// (Julien Pommier's SSE port of the Cephes library, zlib licence), one lane
/// at a time. The constants are Cephes'; `fused_mul_add` marks each multiply-add
/// that GCC fuses in torch's AVX2 build (a product whose only use is one
/// addition, taken in statement order), since fusing changes the last bit.
mod cephes {
    use super::fused_mul_add;

    // Constants are written as doubles (Cephes' digits, shortened to what a
    // double holds) and rounded to float, as the C initialisers do.
    const SQRTHF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32; // 0.707106781186547524
    const LOG_P: [f32; 9] = [
        7.0376836292E-2_f64 as f32,
        -1.1514610310E-1_f64 as f32,
        1.1676998740E-1_f64 as f32,
        -1.2420140846E-1_f64 as f32,
        1.4249322787E-1_f64 as f32,
        -1.6668057665E-1_f64 as f32,
        2.0000714765E-1_f64 as f32,
        -2.4999993993E-1_f64 as f32,
        3.3333331174E-1_f64 as f32,
    ];
    const LOG_Q1: f32 = -2.12194440e-4_f64 as f32;
    const LOG_Q2: f32 = 0.693_359_375_f64 as f32;

    const FOPI: f32 = 1.27323954473516_f64 as f32; // 4 / pi
    const MINUS_DP1: f32 = -0.78515625;
    const MINUS_DP2: f32 = -2.418_756_484_985_351_6e-4_f64 as f32;
    const MINUS_DP3: f32 = -3.774_894_977_445_941e-8_f64 as f32;
    const SIN_P: [f32; 3] = [
        -1.9515295891E-4_f64 as f32,
        8.3321608736E-3_f64 as f32,
        -1.6666654611E-1_f64 as f32,
    ];
    const COS_P: [f32; 3] = [
        2.443315711809948E-005_f64 as f32,
        -1.388731625493765E-003_f64 as f32,
        4.166664568298827E-002_f64 as f32,
    ];

    /// Natural log of a positive, normal float (the Box–Muller `u1` lies in
    /// [2⁻²⁴, 1]); NaN for x ≤ 0.
    pub(super) fn log(x: f32) -> f32 {
        if x.is_nan() || x <= 0.0 {
            return f32::NAN;
        }
        let x = x.max(f32::MIN_POSITIVE);
        let bits = x.to_bits();
        // x = m · 2^e with m in [0.5, 1).
        let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
        let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
        // Below sqrt(1/2) use 2m - 1 and e - 1, else m - 1.
        let small = m < SQRTHF;
        let tmp = if small { m } else { 0.0 };
        m -= 1.0;
        e -= if small { 1.0 } else { 0.0 };
        m += tmp;
        let z = m * m;
        let mut y = LOG_P[0];
        for &p in &LOG_P[1..] {
            y = fused_mul_add(y, m, p);
        }
        y *= m;
        y = fused_mul_add(y, z, e * LOG_Q1);
        y = fused_mul_add(-z, 0.5, y);
        fused_mul_add(e, LOG_Q2, m + y)
    }

    /// (sin x, cos x) for |x| well below 8192 (Box–Muller uses [0, 2π)).
    pub(super) fn sincos(x: f32) -> (f32, f32) {
        let sign_in = x.to_bits() & 0x8000_0000;
        let ax = f32::from_bits(x.to_bits() & 0x7fff_ffff);
        // Octant j (rounded up to even) and the reduced argument.
        let mut j = (ax * FOPI) as i32;
        j = (j + 1) & !1;
        let yj = j as f32;
        let sin_sign = sign_in ^ (((j & 4) as u32) << 29);
        let cos_sign = ((!(j - 2) & 4) as u32) << 29;
        let use_sin_poly = j & 2 == 0;
        let mut r = fused_mul_add(yj, MINUS_DP1, ax);
        r = fused_mul_add(yj, MINUS_DP2, r);
        r = fused_mul_add(yj, MINUS_DP3, r);
        let z = r * r;
        // cos polynomial on [0, pi/4]
        let mut c = fused_mul_add(COS_P[0], z, COS_P[1]);
        c = fused_mul_add(c, z, COS_P[2]);
        c *= z;
        c = fused_mul_add(c, z, -(z * 0.5));
        c += 1.0;
        // sin polynomial on [0, pi/4]
        let mut s = fused_mul_add(SIN_P[0], z, SIN_P[1]);
        s = fused_mul_add(s, z, SIN_P[2]);
        s *= z;
        s = fused_mul_add(s, r, r);
        // The C selects by masks and adds a zero, turning -0 into +0.
        let (sin, cos) = if use_sin_poly { (s, c) } else { (c, s) };
        (
            f32::from_bits((sin + 0.0).to_bits() ^ sin_sign),
            f32::from_bits((cos + 0.0).to_bits() ^ cos_sign),
        )
    }
}
