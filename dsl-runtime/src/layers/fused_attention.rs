//! Scaled dot-product attention in one CPU kernel: per (batch, head group) block, the score
//! product, the masked softmax and the weighted sum of values, the blocks spread over rayon's
//! pool, each product multiplied by `faer` on its thread.
//!
//! dfdx's batched `matmul` runs the products of every block one after another on the calling
//! thread with AVX2 kernels, and its softmax and masking add passes over the scores; on two
//! threads that serial time was a fifth of a GPT-2 step.

#![allow(
    clippy::type_complexity,
    reason = "dfdx tensor types spell their shapes out; aliases would hide the shapes the docs name"
)]

use super::activation::softmax_row;
use super::cpu_fast::as_f;
use super::cpu_fast::{
    block, cpu_vec, filled, for_chunks, for_chunks2, read, stored_call, sum8, Stored, CPU,
};
use super::linear::Gemm;
use super::{cast, Mask, Real};
use dfdx::shapes::{Dim, Dtype, HasShape};
use dfdx::tensor::{PutTape, SplitTape, Tape, Tensor};
use dfdx::tensor_ops::{Device, ReshapeTo};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use std::any::Any;

/// `softmax(q kᵀ / √hd, mask) v` for `q` `(B, G, N, hd)`, `k` `(B, G, T, hd)` and `v`
/// `(B, G, T, hv)`: `(B, G, N, hv)`, every size non-zero, on the CPU in `f32`, `f64`, `f16` or
/// `bf16` (the caller checks both; the half types are computed in `f32`, see [`Stored`]). Row
/// `i` of the scores, counted over `(B, G, N)`, is masked by `mask.row(i)`.
///
/// Forward, per block: `P = softmax(s·Q Kᵀ)`, `O = P V`, with `s = 1/√hd`. Backward, from `dO`:
/// `dV += Pᵀ dO`; `dP = dO Vᵀ`; `dS = P ⊙ (dP − rowsum(dP ⊙ P))` (0 on a row with nothing
/// kept, whose uniform or zero weights do not depend on the scores); `dQ += s·dS K`;
/// `dK += s·dSᵀ Q`. `P` is kept for the backward pass and becomes `dS` in place there.
pub(crate) fn attend_cpu<B, G, N, T, Hd, E, D, Tp>(
    q: Tensor<(B, G, N, Hd), E, D, Tp>,
    k: Tensor<(B, G, T, Hd), E, D, Tp>,
    v: Tensor<(B, G, T, Hd), E, D, Tp>,
    mask: Option<Mask>,
) -> Result<Tensor<(B, G, N, Hd), E, D, Tp>, D::Err>
where
    B: Dim,
    G: Dim,
    N: Dim,
    T: Dim,
    Hd: Dim,
    E: Dtype,
    D: Device<E>,
    Tp: Tape<E, D>,
{
    stored_call!(
        E,
        attend_stacked::<_, B, G, N, T, Hd, E, D, Tp>(q, k, v, mask)
    )
}

/// [`attend_cpu`] for the heads side by side: `q` `(B, S, H·hd)`, `k` `(B, T, H·hd)` and `v`
/// `(B, T, H·hv)`, as the projections write them, to `(B, S, H·hv)`, ready for the output
/// projection. The heads are gathered into blocks and back in parallel passes, where splitting
/// them with dfdx's permuted views made each kernel copy them element by element on one thread.
/// Every size must be non-zero and `heads` must divide both widths.
pub(crate) fn attend_merged_cpu<B, S, T, Wq, Wv, E, D, Tp>(
    q: Tensor<(B, S, Wq), E, D, Tp>,
    k: Tensor<(B, T, Wq), E, D, Tp>,
    v: Tensor<(B, T, Wv), E, D, Tp>,
    heads: usize,
    mask: Option<Mask>,
) -> Result<Tensor<(B, S, Wv), E, D, Tp>, D::Err>
where
    B: Dim,
    S: Dim,
    T: Dim,
    Wq: Dim,
    Wv: Dim,
    E: Dtype,
    D: Device<E>,
    Tp: Tape<E, D>,
{
    stored_call!(
        E,
        attend_merged::<_, B, S, T, Wq, Wv, E, D, Tp>(q, k, v, heads, mask)
    )
}

/// Causal [`attend_merged_cpu`] from one fused projection `qkv` `(B, S, 3·H·hd)` (queries,
/// keys, values side by side, GPT-2's `c_attn`), to `(B, S, H·hd)` typed `out_w`: the three are
/// read from, and their gradients written into, the one buffer, where slicing it made six
/// copies. Every size must be non-zero and `3·heads` must divide the width.
pub(crate) fn attend_packed_causal_cpu<B, S, W3, Wo, E, D, Tp>(
    qkv: Tensor<(B, S, W3), E, D, Tp>,
    heads: usize,
    out_w: Wo,
) -> Result<Tensor<(B, S, Wo), E, D, Tp>, D::Err>
where
    B: Dim,
    S: Dim,
    W3: Dim,
    Wo: Dim,
    E: Dtype,
    D: Device<E>,
    Tp: Tape<E, D>,
{
    let mask = Some(Mask::Causal {
        queries: qkv.shape().1.size(),
        past: 0,
    });
    stored_call!(
        E,
        attend_packed::<_, B, S, W3, Wo, E, D, Tp>(qkv, heads, mask, out_w)
    )
}

/// Sizes of the blocks: `n` queries, `t` keys, `hd` features of queries and keys, `hv` of
/// values.
#[derive(Clone, Copy)]
struct Block {
    n: usize,
    t: usize,
    hd: usize,
    hv: usize,
}

/// What the passes over the blocks share.
struct Core<F> {
    blk: Block,
    /// `1/√hd`.
    scale: F,
    mask: Option<Mask>,
    /// Whether a row with nothing kept becomes zeros (else uniform).
    empty_zero: bool,
}

impl<F: Real + Gemm> Core<F> {
    fn new(blk: Block, mask: Option<Mask>) -> Self {
        let empty_zero = matches!(
            mask,
            Some(Mask::Flags {
                empty_rows_zero: true,
                ..
            })
        );
        Core {
            blk,
            scale: F::from(1.0 / (blk.hd as f64).sqrt()).unwrap(),
            mask,
            empty_zero,
        }
    }

    /// Whether row `r` of block `i` keeps no score.
    fn empty(&self, i: usize, r: usize) -> bool {
        match &self.mask {
            Some(mask) => match mask.row(i * self.blk.n + r, self.blk.t) {
                Ok(keep) => !keep.iter().any(|&k| k),
                Err(len) => len == 0,
            },
            None => false,
        }
    }

    /// The weights `P` and the output, block after block, from `Q`, `K`, `V` stacked by block.
    fn forward(&self, qs: &[F], ks: &[F], vs: &[F]) -> (Vec<F>, Vec<F>) {
        let blk = self.blk;
        let blocks = qs.len() / (blk.n * blk.hd);
        let mut p = filled(blocks * blk.n * blk.t, F::zero());
        let mut out = filled(blocks * blk.n * blk.hv, F::zero());
        for_chunks2(
            &mut p,
            blk.n * blk.t,
            &mut out,
            blk.n * blk.hv,
            #[inline(always)]
            |i, p, o| {
                let scores = MatMut::from_row_major_slice_mut(p, blk.n, blk.t);
                let (qb, kb) = (block(qs, i, blk.n, blk.hd), block(ks, i, blk.t, blk.hd));
                let replace = Accum::Replace;
                matmul(scores, replace, qb, kb.transpose(), self.scale, Par::Seq);
                for (r, row) in p.chunks_exact_mut(blk.t).enumerate() {
                    match &self.mask {
                        Some(mask) => {
                            softmax_row(row, mask.row(i * blk.n + r, blk.t), self.empty_zero)
                        }
                        None => softmax_row(row, Err(blk.t), false),
                    }
                }
                let o = MatMut::from_row_major_slice_mut(o, blk.n, blk.hv);
                let weights = MatRef::from_row_major_slice(p, blk.n, blk.t);
                let vb = block(vs, i, blk.t, blk.hv);
                matmul(o, replace, weights, vb, F::one_impl(), Par::Seq);
            },
        );
        (p, out)
    }

    /// `dV (accum) Pᵀ dO` into `g_v` (`Accum::Add` adds, `Replace` overwrites), and `P`
    /// becomes `dS` in place.
    fn backward_v(&self, p: &mut [F], go: &[F], vs: &[F], g_v: &mut [F], accum: Accum) {
        let blk = self.blk;
        for_chunks2(
            g_v,
            blk.t * blk.hv,
            p,
            blk.n * blk.t,
            #[inline(always)]
            |i, gv, p| {
                let gob = block(go, i, blk.n, blk.hv);
                let weights = MatRef::from_row_major_slice(p, blk.n, blk.t);
                let gv = MatMut::from_row_major_slice_mut(gv, blk.t, blk.hv);
                matmul(gv, accum, weights.transpose(), gob, F::one_impl(), Par::Seq);
                let mut dp = vec![F::zero(); blk.n * blk.t];
                let dpm = MatMut::from_row_major_slice_mut(&mut dp, blk.n, blk.t);
                let vb = block(vs, i, blk.t, blk.hv);
                let replace = Accum::Replace;
                matmul(dpm, replace, gob, vb.transpose(), F::one_impl(), Par::Seq);
                let rows = p.chunks_exact_mut(blk.t).zip(dp.chunks_exact(blk.t));
                for (r, (y, dp)) in rows.enumerate() {
                    softmax_backward_row(y, dp, self.empty(i, r));
                }
            },
        );
    }

    /// `dQ (accum) s·dS K` into `g_q`.
    fn backward_q(&self, ds: &[F], ks: &[F], g_q: &mut [F], accum: Accum) {
        let blk = self.blk;
        for_chunks(g_q, blk.n * blk.hd, |i, gq| {
            let gq = MatMut::from_row_major_slice_mut(gq, blk.n, blk.hd);
            let (dsb, kb) = (block(ds, i, blk.n, blk.t), block(ks, i, blk.t, blk.hd));
            matmul(gq, accum, dsb, kb, self.scale, Par::Seq);
        });
    }

    /// `dK (accum) s·dSᵀ Q` into `g_k`.
    fn backward_k(&self, ds: &[F], qs: &[F], g_k: &mut [F], accum: Accum) {
        let blk = self.blk;
        for_chunks(g_k, blk.t * blk.hd, |i, gk| {
            let gk = MatMut::from_row_major_slice_mut(gk, blk.t, blk.hd);
            let (dsb, qb) = (block(ds, i, blk.n, blk.t), block(qs, i, blk.n, blk.hd));
            matmul(gk, accum, dsb.transpose(), qb, self.scale, Par::Seq);
        });
    }
}

fn attend_stacked<S0, B, G, N, T, Hd, E, D, Tp>(
    q: Tensor<(B, G, N, Hd), E, D, Tp>,
    k: Tensor<(B, G, T, Hd), E, D, Tp>,
    v: Tensor<(B, G, T, Hd), E, D, Tp>,
    mask: Option<Mask>,
) -> Result<Tensor<(B, G, N, Hd), E, D, Tp>, D::Err>
where
    S0: Stored,
    B: Dim,
    G: Dim,
    N: Dim,
    T: Dim,
    Hd: Dim,
    E: Dtype,
    D: Device<E>,
    Tp: Tape<E, D>,
{
    let q_shape = *q.shape();
    let k_shape = *k.shape();
    let v_shape = *v.shape();
    let (b, g, n, hd) = q_shape;
    let core = Core::<S0::F>::new(
        Block {
            n: n.size(),
            t: k_shape.2.size(),
            hd: hd.size(),
            hv: v_shape.3.size(),
        },
        mask,
    );
    // Free for contiguous tensors; permuted views are copied, on the tape, into row-major order.
    let (q, tape) = q.try_reshape_like(&q_shape)?.split_tape();
    let (k, k_tape) = k.try_reshape_like(&k_shape)?.split_tape();
    let (v, v_tape) = v.try_reshape_like(&v_shape)?.split_tape();
    let mut tape = tape.merge(k_tape).merge(v_tape);
    let (qs, ks, vs): (Vec<S0>, Vec<S0>, Vec<S0>) = (read(&q), read(&k), read(&v));
    let (p, out) = core.forward(&S0::compute(&qs), &S0::compute(&ks), &S0::compute(&vs));
    let out = q
        .device()
        .try_tensor_from_vec(cast::<S0, E>(S0::stored(out)), (b, g, n, v_shape.3))?;
    if Tp::OWNS_TAPE {
        let (q, k, v, out_ghost) = (q.ghost(), k.ghost(), v.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let mut p = p;
            let (qs, ks, vs) = (S0::compute(&qs), S0::compute(&ks), S0::compute(&vs));
            let g_out =
                std::mem::take(cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU));
            let go: &Vec<S0> = (&g_out as &dyn Any).downcast_ref().expect(CPU);
            let go = S0::compute(go);
            let g_v = as_f::<E, S0>(cpu_vec::<E, D>(grads.get_or_alloc_mut(&v)?).expect(CPU));
            S0::accumulate(g_v, |g_v| {
                core.backward_v(&mut p, &go, &vs, g_v, Accum::Add)
            });
            let g_q = as_f::<E, S0>(cpu_vec::<E, D>(grads.get_or_alloc_mut(&q)?).expect(CPU));
            S0::accumulate(g_q, |g_q| core.backward_q(&p, &ks, g_q, Accum::Add));
            let g_k = as_f::<E, S0>(cpu_vec::<E, D>(grads.get_or_alloc_mut(&k)?).expect(CPU));
            S0::accumulate(g_k, |g_k| core.backward_k(&p, &qs, g_k, Accum::Add));
            *cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU) = g_out;
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

fn attend_merged<S0, B, S, T, Wq, Wv, E, D, Tp>(
    q: Tensor<(B, S, Wq), E, D, Tp>,
    k: Tensor<(B, T, Wq), E, D, Tp>,
    v: Tensor<(B, T, Wv), E, D, Tp>,
    heads: usize,
    mask: Option<Mask>,
) -> Result<Tensor<(B, S, Wv), E, D, Tp>, D::Err>
where
    S0: Stored,
    B: Dim,
    S: Dim,
    T: Dim,
    Wq: Dim,
    Wv: Dim,
    E: Dtype,
    D: Device<E>,
    Tp: Tape<E, D>,
{
    let q_shape = *q.shape();
    let k_shape = *k.shape();
    let v_shape = *v.shape();
    let (b, s, wq) = q_shape;
    let blk = Block {
        n: s.size(),
        t: k_shape.1.size(),
        hd: wq.size() / heads,
        hv: v_shape.2.size() / heads,
    };
    let core = Core::<S0::F>::new(blk, mask);
    let (q, tape) = q.try_reshape_like(&q_shape)?.split_tape();
    let (k, k_tape) = k.try_reshape_like(&k_shape)?.split_tape();
    let (v, v_tape) = v.try_reshape_like(&v_shape)?.split_tape();
    let mut tape = tape.merge(k_tape).merge(v_tape);
    let whole = |width: usize| Cols { width, offset: 0 };
    let (cq, ck, cv) = (whole(wq.size()), whole(wq.size()), whole(v_shape.2.size()));
    let qs = stack(&read::<_, E, D, S0>(&q), cq, heads, blk.n, blk.hd);
    let ks = stack(&read::<_, E, D, S0>(&k), ck, heads, blk.t, blk.hd);
    let vs = stack(&read::<_, E, D, S0>(&v), cv, heads, blk.t, blk.hv);
    let (p, out) = core.forward(&S0::compute(&qs), &S0::compute(&ks), &S0::compute(&vs));
    let mut merged = filled(out.len(), <S0::F as num_traits::Zero>::zero());
    unstack_add(&mut merged, cv, &out, heads, blk.n, blk.hv);
    let out = q
        .device()
        .try_tensor_from_vec(cast::<S0, E>(S0::stored(merged)), (b, s, v_shape.2))?;
    if Tp::OWNS_TAPE {
        let (q, k, v, out_ghost) = (q.ghost(), k.ghost(), v.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let mut p = p;
            let (qs, ks, vs) = (S0::compute(&qs), S0::compute(&ks), S0::compute(&vs));
            let go = {
                let g = cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU);
                stack(as_f::<E, S0>(g), cv, heads, blk.n, blk.hv)
            };
            let go = S0::compute(&go);
            // One buffer for the three stacked gradients, each overwritten before it is added
            // into its merged tensor's.
            let mut scratch = filled(
                vs.len().max(qs.len()).max(ks.len()),
                <S0::F as num_traits::Zero>::zero(),
            );
            let sv = &mut scratch[..vs.len()];
            core.backward_v(&mut p, &go, &vs, sv, Accum::Replace);
            let g_v = as_f::<E, S0>(cpu_vec::<E, D>(grads.get_or_alloc_mut(&v)?).expect(CPU));
            S0::accumulate(g_v, |g_v| unstack_add(g_v, cv, sv, heads, blk.t, blk.hv));
            let sq = &mut scratch[..qs.len()];
            core.backward_q(&p, &ks, sq, Accum::Replace);
            let g_q = as_f::<E, S0>(cpu_vec::<E, D>(grads.get_or_alloc_mut(&q)?).expect(CPU));
            S0::accumulate(g_q, |g_q| unstack_add(g_q, cq, sq, heads, blk.n, blk.hd));
            let sk = &mut scratch[..ks.len()];
            core.backward_k(&p, &qs, sk, Accum::Replace);
            let g_k = as_f::<E, S0>(cpu_vec::<E, D>(grads.get_or_alloc_mut(&k)?).expect(CPU));
            S0::accumulate(g_k, |g_k| unstack_add(g_k, ck, sk, heads, blk.t, blk.hd));
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

fn attend_packed<S0, B, S, W3, Wo, E, D, Tp>(
    qkv: Tensor<(B, S, W3), E, D, Tp>,
    heads: usize,
    mask: Option<Mask>,
    out_w: Wo,
) -> Result<Tensor<(B, S, Wo), E, D, Tp>, D::Err>
where
    S0: Stored,
    B: Dim,
    S: Dim,
    W3: Dim,
    Wo: Dim,
    E: Dtype,
    D: Device<E>,
    Tp: Tape<E, D>,
{
    let shape = *qkv.shape();
    let (b, s, w3) = shape;
    let m = w3.size() / 3;
    let blk = Block {
        n: s.size(),
        t: s.size(),
        hd: m / heads,
        hv: m / heads,
    };
    let core = Core::<S0::F>::new(blk, mask);
    let (x, mut tape) = qkv.try_reshape_like(&shape)?.split_tape();
    let third = |i: usize| Cols {
        width: 3 * m,
        offset: i * m,
    };
    let (cq, ck, cv) = (third(0), third(1), third(2));
    let (qs, ks, vs) = {
        let all = read::<_, E, D, S0>(&x);
        let qs = stack(&all, cq, heads, blk.n, blk.hd);
        let ks = stack(&all, ck, heads, blk.t, blk.hd);
        (qs, ks, stack(&all, cv, heads, blk.t, blk.hv))
    };
    let (p, out) = core.forward(&S0::compute(&qs), &S0::compute(&ks), &S0::compute(&vs));
    let co = Cols {
        width: m,
        offset: 0,
    };
    let mut merged = filled(out.len(), <S0::F as num_traits::Zero>::zero());
    unstack_add(&mut merged, co, &out, heads, blk.n, blk.hv);
    let out = x
        .device()
        .try_tensor_from_vec(cast::<S0, E>(S0::stored(merged)), (b, s, out_w))?;
    if Tp::OWNS_TAPE {
        let (x, out_ghost) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let mut p = p;
            let (qs, ks, vs) = (S0::compute(&qs), S0::compute(&ks), S0::compute(&vs));
            let go = {
                let g = cpu_vec::<E, D>(grads.get_or_alloc_mut(&out_ghost)?).expect(CPU);
                stack(as_f::<E, S0>(g), co, heads, blk.n, blk.hv)
            };
            let go = S0::compute(&go);
            let mut scratch = filled(qs.len(), <S0::F as num_traits::Zero>::zero());
            let g_x = as_f::<E, S0>(cpu_vec::<E, D>(grads.get_or_alloc_mut(&x)?).expect(CPU));
            // The three gradients are added in the arithmetic's type and rounded once.
            S0::accumulate(g_x, |g_x| {
                core.backward_v(&mut p, &go, &vs, &mut scratch, Accum::Replace);
                unstack_add(g_x, cv, &scratch, heads, blk.t, blk.hv);
                core.backward_q(&p, &ks, &mut scratch, Accum::Replace);
                unstack_add(g_x, cq, &scratch, heads, blk.n, blk.hd);
                core.backward_k(&p, &qs, &mut scratch, Accum::Replace);
                unstack_add(g_x, ck, &scratch, heads, blk.t, blk.hd);
            });
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

/// Where heads lie in the rows of a buffer: the columns `offset..offset + H·w` of rows `width`
/// wide (a projection's output, or one third of a fused query/key/value projection's).
#[derive(Clone, Copy)]
struct Cols {
    width: usize,
    offset: usize,
}

/// The heads at `cols` of `(B, S, width)` as `(B, H, S, w)`, one head of one batch entry per
/// task.
fn stack<F: Copy + Default + Send + Sync>(
    src: &[F],
    cols: Cols,
    heads: usize,
    rows: usize,
    w: usize,
) -> Vec<F> {
    let batch = src.len() / (rows * cols.width);
    let mut out = filled(batch * heads * rows * w, F::default());
    for_chunks(
        &mut out,
        rows * w,
        #[inline(always)]
        |i, blk| {
            let (b, h) = (i / heads, i % heads);
            for (r, row) in blk.chunks_exact_mut(w).enumerate() {
                let at = (b * rows + r) * cols.width + cols.offset + h * w;
                row.copy_from_slice(&src[at..][..w]);
            }
        },
    );
    out
}

/// Adds `(B, H, S, w)` into the heads at `cols` of `(B, S, width)`, one batch entry per task.
fn unstack_add<F: Real>(
    dst: &mut [F],
    cols: Cols,
    stacked: &[F],
    heads: usize,
    rows: usize,
    w: usize,
) {
    for_chunks(
        dst,
        rows * cols.width,
        #[inline(always)]
        |b, m| {
            for (r, row) in m.chunks_exact_mut(cols.width).enumerate() {
                let row = &mut row[cols.offset..][..heads * w];
                for (h, dst) in row.chunks_exact_mut(w).enumerate() {
                    let src = &stacked[((b * heads + h) * rows + r) * w..][..w];
                    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = *d + s);
                }
            }
        },
    );
}

/// One row of the softmax's backward pass, in place over the weights `y`:
/// `y ← y ⊙ (dp − Σ dp ⊙ y)`, or 0 for a row with nothing kept. Masked weights are exactly 0,
/// so their gradient is too.
fn softmax_backward_row<F: Real>(y: &mut [F], dp: &[F], empty: bool) {
    if empty {
        y.iter_mut().for_each(|y| *y = F::zero());
        return;
    }
    let s = sum8(y, dp, |y, g| y.to_f64().unwrap() * g.to_f64().unwrap());
    let s = F::from(s).unwrap();
    for (y, &g) in y.iter_mut().zip(dp) {
        *y = *y * (g - s);
    }
}

#[cfg(test)]
mod tests {
    use super::super::attention::{attend, attend_heads, Keep};
    use super::super::cpu_fast::{assert_rounded_once, composition_only};
    use crate::prelude::*;

    type Q = Tensor<(usize, usize, usize, usize), f64, Cpu>;

    /// The output and the gradients of `inputs` for the loss `Σ out ⊙ w`.
    fn output_and_grads<S: Shape, Si: Shape>(
        out: Tensor<S, f64, Cpu, OwnedTape<f64, Cpu>>,
        w: &Tensor<S, f64, Cpu>,
        [q, k, v]: [&Tensor<Si, f64, Cpu>; 3],
    ) -> [Vec<f64>; 4] {
        let y = out.as_vec();
        let g = (out * w.clone()).sum::<Rank0, _>().backward();
        [y, g.get(q).as_vec(), g.get(k).as_vec(), g.get(v).as_vec()]
    }

    /// Fails when the kernel's output or gradients differ from the composition's.
    fn assert_same(name: &str, fused: &[Vec<f64>; 4], composed: &[Vec<f64>; 4]) {
        for (what, (a, c)) in ["output", "dq", "dk", "dv"]
            .iter()
            .zip(fused.iter().zip(composed))
        {
            let err = a
                .iter()
                .zip(c)
                .map(|(a, c)| (a - c).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-12, "{name}: {what} differs by {err:e}");
        }
    }

    /// [`attend`]'s output and gradients.
    fn run(
        q: &Q,
        k: &Q,
        v: &Q,
        w: &Q,
        keep: impl Fn() -> Option<Keep<(usize, usize, usize, usize), Cpu>>,
        empty_rows: bool,
    ) -> [Vec<f64>; 4] {
        let (qt, kt, vt) = (q.leaky_trace(), k.leaky_trace(), v.leaky_trace());
        output_and_grads(
            attend(qt, kt, vt, keep(), empty_rows).unwrap(),
            w,
            [q, k, v],
        )
    }

    #[test]
    fn the_kernel_equals_the_op_composition_for_every_mask() {
        let dev = Cpu::seed_from_u64(11);
        // Two batch entries, three head groups of two query heads of four positions each
        // (N = 8), six keys with two cached, and values wider than the keys.
        let (b, g, n, t, hd, hv) = (2, 3, 8, 6, 5, 7);
        let q: Q = dev.sample_normal_like(&(b, g, n, hd));
        let k: Q = dev.sample_normal_like(&(b, g, t, hd));
        let v: Q = dev.sample_normal_like(&(b, g, t, hv));
        let w: Q = dev.sample_normal_like(&(b, g, n, hv));
        let mut flags: Vec<bool> = (0..b * g * n * t).map(|i| (i * 7919) % 5 != 0).collect();
        // Row 3 keeps nothing: zero or uniform weights, and no gradient to its scores.
        flags[3 * t..4 * t].iter_mut().for_each(|f| *f = false);
        let flags = dev.tensor_from_vec(flags, (b, g, n, t));
        let cases: Vec<(&str, Box<dyn Fn() -> Option<Keep<_, Cpu>>>, bool)> = vec![
            ("no mask", Box::new(|| None), false),
            (
                "flags, empty rows uniform",
                Box::new(|| Some(Keep::Flags(flags.clone()))),
                false,
            ),
            (
                "flags, empty rows zero",
                Box::new(|| Some(Keep::Flags(flags.clone()))),
                true,
            ),
            (
                "causal with a cache",
                Box::new(|| {
                    Some(Keep::Causal {
                        queries: 4,
                        past: 2,
                    })
                }),
                false,
            ),
        ];
        for (name, keep, empty_rows) in cases {
            let fused = run(&q, &k, &v, &w, &keep, empty_rows);
            let composed = composition_only(|| run(&q, &k, &v, &w, &keep, empty_rows));
            assert_same(name, &fused, &composed);
        }
    }

    type X = Tensor<(usize, usize, usize), f64, Cpu>;

    /// [`attend_heads`]' output and gradients.
    fn run_heads(
        q: &X,
        k: &X,
        v: &X,
        w: &X,
        keep: Option<Tensor<(usize, usize, usize, usize), bool, Cpu>>,
    ) -> [Vec<f64>; 4] {
        let (qt, kt, vt) = (q.leaky_trace(), k.leaky_trace(), v.leaky_trace());
        output_and_grads(
            attend_heads(qt, kt, vt, 3, keep, true).unwrap(),
            w,
            [q, k, v],
        )
    }

    #[test]
    fn heads_side_by_side_equal_the_split_composition() {
        let dev = Cpu::seed_from_u64(12);
        // Three heads of width 4 for queries and keys and 5 for values; 5 queries, 7 keys.
        let (b, s, t, h) = (2, 5, 7, 3);
        let q: X = dev.sample_normal_like(&(b, s, h * 4));
        let k: X = dev.sample_normal_like(&(b, t, h * 4));
        let v: X = dev.sample_normal_like(&(b, t, h * 5));
        let w: X = dev.sample_normal_like(&(b, s, h * 5));
        let mut flags: Vec<bool> = (0..b * h * s * t).map(|i| (i * 31) % 4 != 1).collect();
        flags[2 * t..3 * t].iter_mut().for_each(|f| *f = false);
        let flags = dev.tensor_from_vec(flags, (b, h, s, t));
        for keep in [None, Some(flags)] {
            let fused = run_heads(&q, &k, &v, &w, keep.clone());
            let composed = composition_only(|| run_heads(&q, &k, &v, &w, keep.clone()));
            assert_same(&format!("mask {}", keep.is_some()), &fused, &composed);
        }
    }

    /// The output and the gradients of `inputs` for the loss `Σ out ⊙ w`, in any element type,
    /// as `f64`.
    fn output_and_grads_in<E: crate::Elem, S: Shape, Si: Shape>(
        out: Tensor<S, E, Cpu, OwnedTape<E, Cpu>>,
        w: &Tensor<S, E, Cpu>,
        inputs: &[&Tensor<Si, E, Cpu>],
    ) -> Vec<Vec<f64>>
    where
        Cpu: Device<E>,
    {
        let f64s = |v: Vec<E>| v.iter().map(|x| x.to_f64().unwrap()).collect::<Vec<_>>();
        let y = f64s(out.as_vec());
        let g = (out * w.clone()).sum::<Rank0, _>().backward();
        let mut all = vec![y];
        all.extend(inputs.iter().map(|x| f64s(g.get(*x).as_vec())));
        all
    }

    /// `f16` and `bf16`: each of the three kernels (blocks of heads with a causal mask, heads
    /// side by side with flags, and GPT-2's packed projection) computes in `f32` from the half
    /// inputs and rounds its output and each gradient once: within one spacing of the `f64`
    /// kernel on the same values.
    #[test]
    fn half_kernels_compute_in_f32_and_round_once() {
        half_rounds_once::<half::f16>(2f64.powi(-10));
        half_rounds_once::<half::bf16>(2f64.powi(-7));
    }

    /// Samples in f64 outside [`half_rounds_once`], whose bounds on `H` would make the
    /// sampler's element type ambiguous.
    fn normal4(dev: &Cpu, shape: (usize, usize, usize, usize)) -> Q {
        dev.sample_normal_like(&shape)
    }

    fn normal3(dev: &Cpu, shape: (usize, usize, usize)) -> X {
        dev.sample_normal_like(&shape)
    }

    fn half_rounds_once<H>(spacing: f64)
    where
        H: crate::Elem + num_traits::AsPrimitive<f64>,
        Cpu: Device<H>,
        f64: num_traits::AsPrimitive<H>,
    {
        let dev = Cpu::seed_from_u64(13);
        // Inputs rounded to `H`, so that the f64 reference sees the same values.
        let rounded = |x: Q| x.to_dtype::<H>().to_dtype::<f64>();
        let (b, g, n, t, hd) = (2, 3, 8, 6, 16);
        let q = rounded(normal4(&dev, (b, g, n, hd)));
        let k = rounded(normal4(&dev, (b, g, t, hd)));
        let v = rounded(normal4(&dev, (b, g, t, hd)));
        let w = rounded(normal4(&dev, (b, g, n, hd)));
        let causal = || {
            Some(Keep::Causal {
                queries: 4,
                past: 2,
            })
        };
        let want = run(&q, &k, &v, &w, causal, false);
        let [qh, kh, vh, wh] = [&q, &k, &v, &w].map(|x| x.clone().to_dtype::<H>());
        let out = attend(
            qh.leaky_trace(),
            kh.leaky_trace(),
            vh.leaky_trace(),
            causal(),
            false,
        );
        let got = output_and_grads_in(out.unwrap(), &wh, &[&qh, &kh, &vh]);
        assert_rounded_once("blocks of heads", &got, &want, spacing);

        let rounded = |x: X| x.to_dtype::<H>().to_dtype::<f64>();
        let (s, heads) = (5, 3);
        let q = rounded(normal3(&dev, (b, s, heads * 8)));
        let k = rounded(normal3(&dev, (b, t, heads * 8)));
        let v = rounded(normal3(&dev, (b, t, heads * 8)));
        let w = rounded(normal3(&dev, (b, s, heads * 8)));
        let flags: Vec<bool> = (0..b * heads * s * t).map(|i| (i * 31) % 4 != 1).collect();
        let flags = dev.tensor_from_vec(flags, (b, heads, s, t));
        let want = run_heads(&q, &k, &v, &w, Some(flags.clone()));
        let [qh, kh, vh, wh] = [&q, &k, &v, &w].map(|x| x.clone().to_dtype::<H>());
        let (qt, kt, vt) = (qh.leaky_trace(), kh.leaky_trace(), vh.leaky_trace());
        let out = attend_heads(qt, kt, vt, heads, Some(flags), true);
        let got = output_and_grads_in(out.unwrap(), &wh, &[&qh, &kh, &vh]);
        assert_rounded_once("heads side by side", &got, &want, spacing);

        let qkv = rounded(normal3(&dev, (b, s, 3 * heads * 8)));
        let w = rounded(normal3(&dev, (b, s, heads * 8)));
        let packed = |qkv: &X, w: &X| {
            let out = super::attend_packed_causal_cpu(qkv.leaky_trace(), heads, heads * 8);
            output_and_grads_in::<f64, _, _>(out.unwrap(), w, &[qkv])
        };
        let want = packed(&qkv, &w);
        let (qkvh, wh) = (qkv.to_dtype::<H>(), w.to_dtype::<H>());
        let out = super::attend_packed_causal_cpu(qkvh.leaky_trace(), heads, heads * 8);
        let got = output_and_grads_in(out.unwrap(), &wh, &[&qkvh]);
        assert_rounded_once("packed projection", &got, &want, spacing);
    }
}
