//! What the fused CPU paths of the layers share: whether the device is the CPU, and the CPU's
//! buffers as the `Vec`s they are.
//!
//! dfdx's kernel traits are crate-private, so a fused layer is written against its public tape
//! API (`split_tape`, `copy_into`, `tensor_from_vec`, `Tape::add_backward_op`,
//! `Gradients::get_or_alloc_mut`) and chosen at run time by the device's type; every other
//! device takes the layer's composition of dfdx ops, which the tests also run on the CPU
//! through [`composition_only`].

use dfdx::shapes::{Dtype, HasShape, Shape};
use dfdx::tensor::{CopySlice, Cpu, SplitTape, Storage, Tape, Tensor};

#[cfg(test)]
thread_local! {
    /// Set by [`composition_only`] for the duration of a test.
    static COMPOSITION_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the CPU fast paths switched off on this thread, so that the tests cover the
/// op-composition path that other devices take.
#[cfg(test)]
pub(crate) fn composition_only<R>(f: impl FnOnce() -> R) -> R {
    COMPOSITION_ONLY.with(|c| c.set(true));
    let r = f();
    COMPOSITION_ONLY.with(|c| c.set(false));
    r
}

/// Whether `D` is the CPU (and the tests did not switch the fast paths off).
pub(crate) fn fused_cpu<E: Dtype, D: Storage<E>>() -> bool {
    #[cfg(test)]
    if COMPOSITION_ONLY.with(|c| c.get()) {
        return false;
    }
    std::any::TypeId::of::<D>() == std::any::TypeId::of::<Cpu>()
}

/// Whether the fused CPU kernels that store half types as they are ([`Stored`]) take `E` on
/// `D`: `f32`, `f64`, `f16` and `bf16` on the CPU.
pub(crate) fn fused_stored<E: Dtype, D: Storage<E>>() -> bool {
    use std::any::TypeId;
    let e = TypeId::of::<E>();
    let half = e == TypeId::of::<half::f16>() || e == TypeId::of::<half::bf16>();
    (half && fused_cpu::<E, D>()) || fused_float::<E, D>()
}

/// `$f::<S, $t...>($a...)` with `S` the [`Stored`] type that the element type `$e` is; the
/// caller checked [`fused_stored`], so what is not `f32`, `f64` or `f16` is `bf16`.
macro_rules! stored_call {
    ($e:ty, $f:ident::<_ $(, $t:ty)*>($($a:expr),* $(,)?)) => {{
        use std::any::TypeId;
        let e = TypeId::of::<$e>();
        if e == TypeId::of::<f32>() {
            $f::<f32 $(, $t)*>($($a),*)
        } else if e == TypeId::of::<f64>() {
            $f::<f64 $(, $t)*>($($a),*)
        } else if e == TypeId::of::<half::f16>() {
            $f::<half::f16 $(, $t)*>($($a),*)
        } else {
            $f::<half::bf16 $(, $t)*>($($a),*)
        }
    }};
}
pub(crate) use stored_call;

/// Whether the fused CPU kernels take `E` on `D`: `f32` and `f64` on the CPU.
pub(crate) fn fused_float<E: Dtype, D: Storage<E>>() -> bool {
    use std::any::TypeId;
    let float =
        TypeId::of::<E>() == TypeId::of::<f32>() || TypeId::of::<E>() == TypeId::of::<f64>();
    float && fused_cpu::<E, D>()
}

/// What a fused path says when a downcast that [`fused_cpu`] vouched for fails.
pub(crate) const CPU: &str = "fused_cpu checked that the device is the CPU";

/// A CPU gradient buffer as the `Vec` it is; `None` on any other device.
pub(crate) fn cpu_vec<E: Dtype, D: Storage<E>>(v: &mut D::Vec) -> Option<&mut Vec<E>> {
    let v: &mut dyn std::any::Any = v;
    v.downcast_mut::<<Cpu as Storage<E>>::Vec>()
        .map(|v| &mut **v)
}

/// A CPU buffer of `E` as the `Vec<F>` it is (`E` = `F`, checked by the caller).
#[allow(
    clippy::ptr_arg,
    reason = "the downcast is from Vec<E>, the type of dfdx's CPU buffers"
)]
pub(crate) fn as_f<E: 'static, F: 'static>(v: &mut Vec<E>) -> &mut Vec<F> {
    (v as &mut dyn std::any::Any).downcast_mut().expect(CPU)
}

/// A tensor as the CPU tensor it is, for reading it by index without a copy; `None` on any
/// other device.
pub(super) fn cpu_tensor<S: Shape, E: Dtype, D: Storage<E>>(
    t: &Tensor<S, E, D>,
) -> Option<&Tensor<S, E, Cpu>> {
    let t: &dyn std::any::Any = t;
    t.downcast_ref()
}

/// Runs `f` on the CPU fast path, then on the op composition that other devices take; `f` gets
/// the path's name for its messages.
#[cfg(test)]
pub(crate) fn both_paths(mut f: impl FnMut(&str)) {
    f("fused CPU path");
    composition_only(|| f("op composition"));
}

/// `Σ f(a[i], b[i])` in `f64`, in eight independent partial sums: one running sum is a chain
/// of dependent additions that the compiler may not reorder; eight of them vectorise.
#[inline(always)]
pub(crate) fn sum8<A, B>(a: &[A], b: &[B], f: impl Fn(&A, &B) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = (ca.remainder().iter().zip(cb.remainder()))
        .map(|(a, b)| f(a, b))
        .sum();
    for (a, b) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += f(&a[k], &b[k]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// The largest value of `v` (NaN ignored, as `Float::max` ignores it; −∞ when `v` is empty),
/// in eight independent running maxima, for the reason [`sum8`] keeps eight sums. A maximum is
/// exact, so the grouping does not change the result.
#[inline(always)]
pub(crate) fn max8<F: num_traits::Float>(v: &[F]) -> F {
    let mut acc = [F::neg_infinity(); 8];
    let chunks = v.chunks_exact(8);
    let tail = (chunks.remainder().iter()).fold(F::neg_infinity(), |a, &b| a.max(b));
    for x in chunks {
        for k in 0..8 {
            acc[k] = acc[k].max(x[k]);
        }
    }
    acc.iter().fold(tail, |a, &b| a.max(b))
}

/// Elements one rayon task of a fused kernel works on: below this, handing rows to another
/// thread costs more than it saves, and the whole tensor runs on the calling thread.
pub(crate) const TASK_ELEMS: usize = 1 << 15;

/// Runs `f(first_row, chunk)` over consecutive chunks of whole rows of `out` (rows of
/// `row_len` elements), on rayon's pool (sized by `RAYON_NUM_THREADS`) when there is more than
/// one chunk, and returns what each chunk returned, in row order. The chunks depend only on the
/// sizes, never on the number of threads, so sums over the results are the same bits whatever
/// the pool. Each chunk runs under [`simd`], as in [`for_chunks`] and [`for_chunks2`].
pub(crate) fn par_rows<B: Send, R: Send>(
    out: &mut [B],
    row_len: usize,
    f: impl Fn(usize, &mut [B]) -> R + Sync + Send,
) -> Vec<R> {
    use rayon::prelude::*;
    let row_len = row_len.max(1);
    let rows_per_task = (TASK_ELEMS / row_len).max(1);
    let chunk = rows_per_task * row_len;
    if out.len() <= chunk {
        return vec![simd(
            #[inline(always)]
            || f(0, out),
        )];
    }
    out.par_chunks_mut(chunk)
        .enumerate()
        .map(|(i, c)| {
            simd(
                #[inline(always)]
                || f(i * rows_per_task, c),
            )
        })
        .collect()
}

/// Runs `f(i, chunk)` over the consecutive `len`-element chunks of `a` (`i` counts them), on
/// rayon's pool when it has more than one thread, else on the calling thread: a one-thread pool
/// would only add a hand-over and a wake-up to every call.
pub(crate) fn for_chunks<A: Send>(a: &mut [A], len: usize, f: impl Fn(usize, &mut [A]) + Sync) {
    use rayon::prelude::*;
    if rayon::current_num_threads() > 1 {
        a.par_chunks_mut(len).enumerate().for_each(|(i, c)| {
            simd(
                #[inline(always)]
                || f(i, c),
            )
        });
    } else {
        a.chunks_mut(len).enumerate().for_each(|(i, c)| {
            simd(
                #[inline(always)]
                || f(i, c),
            )
        });
    }
}

/// `f()` compiled again for AVX-512 and for AVX2 (with FMA), and run as the best this CPU has
/// (`pulp`'s run-time dispatch; the binary itself targets plain x86-64, SSE2). The loops
/// inlined into `f` are then vectorised 16 or 8 `f32` wide instead of 4: GELU on one thread
/// ran 2.1× faster, softmax 1.5×. Only what is inlined gains, so the kernels mark the
/// closures they pass to [`par_rows`] and the `for_chunks` family `#[inline(always)]`. The
/// results are the same bits: Rust never contracts a product and a sum into an FMA, and the
/// sums keep their order.
///
/// Builds with debug assertions (the dev and test profiles) call `f` directly: every marked
/// closure is otherwise compiled three times in every crate that instantiates the kernel (the
/// examples library alone took 241 s to build for tests instead of 200 s), for a speed no test
/// needs. Release
/// and bench builds dispatch; `simd_changes_no_bits` checks the dispatched arithmetic in any
/// profile.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// [`simd`] in builds with debug assertions: `f()`.
#[cfg(debug_assertions)]
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// [`for_chunks`] with scratch space: `f(scratch, i, chunk)`, each `scratch` made by `init`
/// once per task rayon runs (a few per thread, rayon's `for_each_init`), not once per chunk.
pub(crate) fn for_chunks_with<A: Send, S>(
    a: &mut [A],
    len: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &mut [A]) + Sync + Send,
) {
    use rayon::prelude::*;
    if rayon::current_num_threads() > 1 {
        a.par_chunks_mut(len)
            .enumerate()
            .for_each_init(init, |s, (i, c)| f(s, i, c));
    } else {
        let mut s = init();
        a.chunks_mut(len)
            .enumerate()
            .for_each(|(i, c)| f(&mut s, i, c));
    }
}

/// [`for_chunks`] over two buffers in step: `f(i, a_chunk, b_chunk)`.
pub(crate) fn for_chunks2<A: Send, B: Send>(
    a: &mut [A],
    a_len: usize,
    b: &mut [B],
    b_len: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    use rayon::prelude::*;
    if rayon::current_num_threads() > 1 {
        (a.par_chunks_mut(a_len).zip(b.par_chunks_mut(b_len)))
            .enumerate()
            .for_each(|(i, (a, b))| {
                simd(
                    #[inline(always)]
                    || f(i, a, b),
                )
            });
    } else {
        (a.chunks_mut(a_len).zip(b.chunks_mut(b_len)))
            .enumerate()
            .for_each(|(i, (a, b))| {
                simd(
                    #[inline(always)]
                    || f(i, a, b),
                )
            });
    }
}

/// `n` copies of `value` (zeros, in practice), written by rayon's pool when the buffer is large:
/// the allocator hands back memory it has used before, so a zeroed buffer is a `memset`, and on
/// the calling thread those were half of a ResNet step's serial time.
pub(crate) fn filled<E: Copy + Send + Sync>(n: usize, value: E) -> Vec<E> {
    use rayon::prelude::*;
    if n < 1 << 16 || rayon::current_num_threads() == 1 {
        return vec![value; n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(value, n));
    v
}

/// Matrix `i` of `all`, a row-major stack of `rows × cols` matrices (for `faer`).
pub(crate) fn block<F>(all: &[F], i: usize, rows: usize, cols: usize) -> faer::MatRef<'_, F> {
    faer::MatRef::from_row_major_slice(&all[i * rows * cols..][..rows * cols], rows, cols)
}

/// A tensor's elements in memory order (row-major for a contiguous tensor), as `F` = `E`
/// (checked by the caller): the one way dfdx lets a kernel read a tensor, a copy.
pub(crate) fn read<S: Shape, E: Dtype, D: Storage<E> + CopySlice<E>, F: 'static>(
    t: &Tensor<S, E, D>,
) -> Vec<F> {
    let mut buf = filled(t.shape().num_elements(), E::default());
    t.copy_into(&mut buf);
    super::cast(buf)
}

/// A parameter of a fused kernel: its tensor, joined to the graph of `tape` (for its gradient),
/// and its values as `F` = `E`.
pub(crate) fn take_param<S, E, D, T, F>(
    p: &Tensor<S, E, D>,
    tape: &mut T,
) -> (Tensor<S, E, D>, Vec<F>)
where
    S: Shape,
    E: Dtype,
    D: Storage<E> + CopySlice<E>,
    T: Tape<E, D>,
    F: 'static,
{
    let (p, p_tape) = p.retaped::<T>().split_tape();
    *tape = std::mem::take(tape).merge(p_tape);
    let values = read(&p);
    (p, values)
}

/// A 16-bit float that slices convert to and from `f32` (`half`'s vectorised conversions).
pub(crate) trait HalfSlice: Copy + Default + Send + Sync + 'static {
    /// `dst[i] = src[i]` widened.
    fn widen(src: &[Self], dst: &mut [f32]);
    /// `dst[i] = src[i]` rounded to nearest.
    fn narrow(src: &[f32], dst: &mut [Self]);
}

macro_rules! half_slice {
    ($h:ty) => {
        impl HalfSlice for $h {
            fn widen(src: &[Self], dst: &mut [f32]) {
                use half::slice::HalfFloatSliceExt;
                src.convert_to_f32_slice(dst);
            }
            fn narrow(src: &[f32], dst: &mut [Self]) {
                use half::slice::HalfFloatSliceExt;
                dst.convert_from_f32_slice(src);
            }
        }
    };
}
half_slice!(half::f16);

/// `half` converts `bf16` one element at a time with branches (it has no SIMD path for it);
/// these are the same conversions written branch-free, which the compiler vectorises.
impl HalfSlice for half::bf16 {
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
    }
    fn narrow(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            let x = s.to_bits();
            // Round to nearest, ties to even: adding 0x7fff plus the lowest kept bit carries
            // into the kept bits exactly when the dropped half is above a tie, or a tie with an
            // odd kept part. No finite value or infinity can wrap.
            let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
            // A NaN stays a NaN (quiet), where rounding could carry it into an infinity.
            let nan = (x & 0x7fff_ffff) > 0x7f80_0000;
            let bits = if nan { (x >> 16) | 0x0040 } else { rounded };
            *d = half::bf16::from_bits(bits as u16);
        }
    }
}

/// `src` widened to `f32`, a block per task of rayon's pool.
pub(crate) fn widened<H: HalfSlice>(src: &[H]) -> Vec<f32> {
    let mut out = vec![0.0f32; src.len()];
    for_chunks(
        &mut out,
        TASK_ELEMS,
        #[inline(always)]
        |i, o| H::widen(&src[i * TASK_ELEMS..][..o.len()], o),
    );
    out
}

/// `dst[i] = src[i]` rounded to nearest, a block per task of rayon's pool.
pub(crate) fn narrow_into<H: HalfSlice>(src: &[f32], dst: &mut [H]) {
    for_chunks(
        dst,
        TASK_ELEMS,
        #[inline(always)]
        |i, d| H::narrow(&src[i * TASK_ELEMS..][..d.len()], d),
    );
}

/// `v` in `f64`, exactly (the arithmetic types are `f32` and `f64`).
#[inline(always)]
pub(crate) fn f64_of<F: super::Real>(v: F) -> f64 {
    v.to_f64().unwrap_or(f64::NAN)
}

/// `v` rounded to the arithmetic type `F` (`as`, round to nearest).
#[inline(always)]
pub(crate) fn of_f64<F: super::Real>(v: f64) -> F {
    F::from(v).unwrap_or_else(F::nan)
}

/// Stored values in `f64`, exactly: the parameters that norms keep in `f64`.
pub(crate) fn in_f64<S: Stored>(v: &[S]) -> Vec<f64> {
    S::compute(v).iter().map(|&v| f64_of(v)).collect()
}

/// How a fused kernel stores an element type and what it computes in: `f32` and `f64` are
/// computed as they are; `f16` and `bf16` are kept as they are (half the memory of `f32` on the
/// tape) and widened to `f32` for each product, whose result is rounded once, as PyTorch's
/// CPU autocast computes them.
pub(crate) trait Stored: Copy + Default + Send + Sync + 'static {
    /// The type the arithmetic runs in.
    type F: super::linear::Gemm + super::Real;
    /// `v` in the arithmetic's type: borrowed when it already is.
    fn compute(v: &[Self]) -> std::borrow::Cow<'_, [Self::F]>;
    /// `v` in the arithmetic's type: moved when it already is.
    fn into_compute(v: Vec<Self>) -> Vec<Self::F>;
    /// A result, stored: moved when it already is, rounded once otherwise.
    fn stored(v: Vec<Self::F>) -> Vec<Self>;
    /// Runs `f` on `dst` in the arithmetic's type: `dst` itself, or a widened copy that is
    /// rounded back once, so that what `f` adds is accumulated in `f32`.
    fn accumulate(dst: &mut [Self], f: impl FnOnce(&mut [Self::F]));

    /// `dst[i] += src[i]`, a block per task of rayon's pool. For the half types this is
    /// exactly `half`'s `+=`, which also adds in `f32` and rounds once, with the conversions
    /// done a block at a time rather than one value at a time.
    fn add_assign_all(dst: &mut [Self], src: &[Self]) {
        for_chunks(
            dst,
            TASK_ELEMS,
            #[inline(always)]
            |i, d| {
                let s = Self::compute(&src[i * TASK_ELEMS..][..d.len()]);
                Self::accumulate(d, |d| {
                    d.iter_mut().zip(s.iter()).for_each(|(d, &v)| *d += v)
                });
            },
        );
    }
}

macro_rules! stored_as_is {
    ($f:ty) => {
        impl Stored for $f {
            type F = $f;
            fn compute(v: &[Self]) -> std::borrow::Cow<'_, [Self]> {
                std::borrow::Cow::Borrowed(v)
            }
            fn into_compute(v: Vec<Self>) -> Vec<Self> {
                v
            }
            fn stored(v: Vec<Self>) -> Vec<Self> {
                v
            }
            #[inline(always)]
            fn accumulate(dst: &mut [Self], f: impl FnOnce(&mut [Self])) {
                f(dst)
            }
        }
    };
}
stored_as_is!(f32);
stored_as_is!(f64);

macro_rules! stored_widened {
    ($h:ty) => {
        impl Stored for $h {
            type F = f32;
            fn compute(v: &[Self]) -> std::borrow::Cow<'_, [f32]> {
                std::borrow::Cow::Owned(widened(v))
            }
            fn into_compute(v: Vec<Self>) -> Vec<f32> {
                widened(&v)
            }
            fn stored(v: Vec<f32>) -> Vec<Self> {
                let mut out = vec![<$h>::default(); v.len()];
                narrow_into(&v, &mut out);
                out
            }
            #[inline(always)]
            fn accumulate(dst: &mut [Self], f: impl FnOnce(&mut [f32])) {
                let mut acc = widened(dst);
                f(&mut acc);
                narrow_into(&acc, dst);
            }
        }
    };
}
stored_widened!(half::f16);
stored_widened!(half::bf16);

/// What the half-precision tests of the fused kernels hold them to, a kernel that computes in
/// `f32` from the half inputs and rounds each result once: fails unless every value of `got`
/// is within one spacing of `want`'s (the `f64` kernel's on the same values), plus `1e-5` of
/// the largest magnitude of its vector, the f32 arithmetic's own error where values cancel.
#[cfg(test)]
pub(crate) fn assert_rounded_once(name: &str, got: &[Vec<f64>], want: &[Vec<f64>], spacing: f64) {
    for (which, (got, want)) in got.iter().zip(want).enumerate() {
        let size = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (j, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= spacing * w.abs() + 1e-5 * size,
                "{name}: value {j} of output/gradient {which}: {g}, the f64 kernel's {w}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HalfSlice;

    /// `max8` is the maximum `fold` gives, for every length around its blocks of eight, with
    /// NaNs ignored and −∞ for nothing.
    #[test]
    fn max8_is_the_maximum_ignoring_nan() {
        let values: Vec<f32> = (0..40).map(|i| ((i * 37) % 23) as f32 - 11.5).collect();
        for n in 0..values.len() {
            let v = &values[..n];
            let want = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(super::max8(v).to_bits(), want.to_bits(), "length {n}");
        }
        let mut v = values.clone();
        v[3] = f32::NAN;
        v[17] = f32::NAN;
        let want = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        assert!(!want.is_nan() && want > 10.0);
        assert_eq!(super::max8(&v), want);
        assert_eq!(super::max8::<f64>(&[]), f64::NEG_INFINITY);
    }

    /// A loop run under pulp's dispatch (AVX-512 or AVX2 where the CPU has them), as `simd`
    /// runs the kernels in release builds, gives the same bits as the same arithmetic outside
    /// it: wider vectors, no fused multiply-adds.
    #[test]
    fn simd_changes_no_bits() {
        use crate::layers::Real;
        let x: Vec<f32> = (0..10_000).map(|i| (i as f32 - 5000.0) * 1.7e-3).collect();
        #[inline(always)]
        fn f(v: f32) -> f32 {
            0.5 * v * (1.0 + (0.797_884_6 * (v + 0.044715 * v * v * v)).tanh_())
        }
        let plain: Vec<u32> = x
            .iter()
            .map(|&v| std::hint::black_box(f(v)).to_bits())
            .collect();
        let mut wide = x.clone();
        // pulp itself, not `simd`: that dispatches only in release builds.
        pulp::Arch::new().dispatch(
            #[inline(always)]
            || wide.iter_mut().for_each(|v| *v = f(*v)),
        );
        let wide: Vec<u32> = wide.iter().map(|v| v.to_bits()).collect();
        assert_eq!(plain, wide);
    }

    /// The branch-free `bf16` conversions equal `half`'s, over a spread of bit patterns that
    /// covers ties, both signs, subnormals, infinities and NaNs.
    #[test]
    fn bf16_conversions_equal_halfs() {
        let mut bits: Vec<u32> = (0..=u32::MAX).step_by(9973).collect();
        for base in [
            0u32,
            0x3f80_0000,
            0x7f7f_0000,
            0x7f80_0000,
            0x8000_0000,
            0xff7f_0000,
        ] {
            bits.extend((0..0x2_0000).map(|lo| base.wrapping_add(lo)));
        }
        let xs: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let mut ours = vec![half::bf16::ZERO; xs.len()];
        half::bf16::narrow(&xs, &mut ours);
        for (x, got) in xs.iter().zip(&ours) {
            let want = half::bf16::from_f32(*x);
            assert_eq!(got.to_bits(), want.to_bits(), "{x:?} ({:#x})", x.to_bits());
        }
        let mut back = vec![0.0f32; ours.len()];
        half::bf16::widen(&ours, &mut back);
        for (h, w) in ours.iter().zip(&back) {
            assert_eq!(w.to_bits(), h.to_f32().to_bits());
        }
    }
}
