//! A `model!` network with a residual, a repeated block and a nested model: gradients against
//! central finite differences in f64, safetensors round trip, `PARAMS`.

use neural_arch::gradcheck::{check_input_grads, check_param_grads, named_values};
use neural_arch::prelude::*;

model! {
    /// A pre-norm MLP block with a residual connection, written as a graph.
    pub struct Block<const D: usize, const F: usize> {
        ln: LayerNorm<D>,
        up: Linear<D, F>,
        act: GeluTanh,
        down: Linear<F, D>,
    }
    forward(x: [B, T, D]) -> [B, T, D] {
        let h = down(act(up(ln(x))));
        x + h
    }
}

model! {
    /// Embedding-free toy transformer trunk: nested blocks, repeated, then a head.
    pub struct Net<const D: usize> {
        proj: Linear<3, D>,
        blocks: [Block<D, 8>; 2],
        res: Residual<Block<D, 4>>,
        ln_f: LayerNorm<D>,
        head: LinearNoBias<D, 2>,
    }
}

model! {
    /// Two inputs, two outputs, a shared layer and a merge: the shape of CLIP's two towers.
    pub struct TwoTower {
        img: Linear<4, 3>,
        txt: Linear<5, 3>,
        shared: Linear<3, 3>,
        drop: Dropout<0>,
    }
    forward(a: [B, 4], b: [B, 5]) -> ([B, 3], [B, 3]) {
        let ea = shared(img(a));
        let eb = shared(txt(b));
        let both = drop(ea * eb);
        (ea + both, eb - both)
    }
}

type Dev = Cpu;

#[test]
fn params_const_equals_runtime_count() {
    let dev = Dev::default();
    let net = dev.build_module::<Net<6>, f64>();
    assert_eq!(Net::<6>::PARAMS, net.num_trainable_params());
    let block = dev.build_module::<Block<6, 8>, f32>();
    assert_eq!(Block::<6, 8>::PARAMS, block.num_trainable_params());
    let tt = dev.build_module::<TwoTower, f32>();
    assert_eq!(TwoTower::PARAMS, tt.num_trainable_params());
    // By hand: proj 3·6+6, block 2·6 + 6·8+8 + 8·6+6, res block with F = 4, ln_f 12, head 12.
    let block = |f: usize| 12 + 6 * f + f + f * 6 + 6;
    assert_eq!(Net::<6>::PARAMS, 24 + 2 * block(8) + block(4) + 12 + 12);
}

#[test]
fn gradients_match_central_differences() {
    let dev = Dev::seed_from_u64(7);
    let mut net = dev.build_module::<Net<6>, f64>();
    let x: Tensor<Rank3<2, 3, 3>, f64, Dev> = dev.sample_normal();
    // A loss that depends on every output element, non-linearly.
    let report = check_param_grads(&mut net, |m, grads| {
        let y = m.forward(x.trace(grads));
        (y.with_empty_tape().square() + y).sum::<Rank0, _>()
    });
    assert_eq!(
        report.checked,
        Net::<6>::PARAMS,
        "every parameter was checked"
    );
    assert!(report.max_abs_err <= 1e-6, "{report}");
    let names: Vec<String> = named_values(&mut net).into_iter().map(|(n, _)| n).collect();
    assert!(
        names.contains(&"blocks.1.up.weight".to_string()),
        "{names:?}"
    );
    assert!(names.contains(&"res.0.ln.bias".to_string()), "{names:?}");
    eprintln!("parameters: {report}");

    // And through the input, for the residual paths.
    let report = check_input_grads(&x, |x| net.forward(x).square().mean::<Rank0, _>());
    assert!(report.max_abs_err <= 1e-6, "{report}");
    eprintln!("input: {report}");
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "na-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn safetensors_round_trip_uses_dotted_layer_names() {
    let dev = Dev::seed_from_u64(1);
    let net = dev.build_module::<Net<6>, f32>();
    let dir = tempdir();
    let path = dir.join("net.safetensors");
    net.save_safetensors(&path).unwrap();
    let keys = {
        let bytes = std::fs::read(&path).unwrap();
        let st = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut k: Vec<String> = st.names().into_iter().cloned().collect();
        k.sort();
        k
    };
    let want = [
        "blocks.0.down.bias",
        "blocks.0.down.weight",
        "blocks.0.ln.bias",
        "blocks.0.ln.weight",
        "blocks.0.up.bias",
        "blocks.0.up.weight",
        "blocks.1.down.bias",
        "blocks.1.down.weight",
        "blocks.1.ln.bias",
        "blocks.1.ln.weight",
        "blocks.1.up.bias",
        "blocks.1.up.weight",
        "head.weight",
        "ln_f.bias",
        "ln_f.weight",
        "proj.bias",
        "proj.weight",
        "res.0.down.bias",
        "res.0.down.weight",
        "res.0.ln.bias",
        "res.0.ln.weight",
        "res.0.up.bias",
        "res.0.up.weight",
    ];
    assert_eq!(keys, want);

    let mut fresh = Dev::seed_from_u64(2).build_module::<Net<6>, f32>();
    let x: Tensor<Rank3<2, 5, 3>, f32, Dev> = dev.sample_normal();
    assert_ne!(
        fresh.forward(x.clone()).array(),
        net.forward(x.clone()).array()
    );
    fresh.load_safetensors(&path).unwrap();
    assert_eq!(fresh.forward(x.clone()).array(), net.forward(x).array());
}

#[test]
fn graph_with_two_inputs_and_outputs_backpropagates_to_every_layer() {
    let dev = Dev::seed_from_u64(3);
    let mut tt = dev.build_module::<TwoTower, f64>();
    let a: Tensor<(usize, Const<4>), f64, Dev> = dev.sample_normal_like(&(5, Const));
    let b: Tensor<(usize, Const<5>), f64, Dev> = dev.sample_normal_like(&(5, Const));
    let grads = tt.alloc_grads();
    let (ya, yb) = tt.forward_mut((a.trace(grads), b.retaped::<OwnedTape<f64, Dev>>()));
    assert_eq!(ya.shape().0, 5);
    let loss = (ya + yb).square().mean::<Rank0, _>();
    let g = loss.backward();
    for w in [
        g.get(&tt.img.weight).as_vec(),
        g.get(&tt.txt.weight).as_vec(),
        g.get(&tt.shared.weight).as_vec(),
    ] {
        assert!(w.iter().any(|v| *v != 0.0));
    }
}

#[test]
fn summary_lists_layers_shapes_and_counts() {
    let s = Block::<6, 8>::summary();
    let text = s.to_string();
    assert!(text.contains("up"), "{text}");
    assert_eq!(s.rows[1].output, "[B, T, 8]", "{text}");
    assert_eq!(s.rows[1].params, 6 * 8 + 8);
    let n = Net::<6>::summary().to_string();
    assert!(n.contains("blocks.0.up"), "{n}");
    assert!(n.contains(
        &format!("{}", Net::<6>::PARAMS)
            .chars()
            .take(1)
            .collect::<String>()
    ));
}

model! {
    /// Self-attention with generic width and heads: the heads-divide-width rule is checked when
    /// the sizes are known.
    pub struct AttnBlock<const D: usize, const H: usize> {
        ln: LayerNorm<D>,
        attn: SelfAttention<D, H>,
    }
    forward(x: [B, S, D]) -> [B, S, D] {
        x + attn(ln(x))
    }
}

#[test]
fn attention_block_builds_and_counts() {
    let dev = Dev::default();
    let m = dev.build_module::<AttnBlock<8, 2>, f32>();
    assert_eq!(AttnBlock::<8, 2>::PARAMS, m.num_trainable_params());
    let x: Tensor<Rank3<2, 3, 8>, f32, Dev> = dev.sample_normal();
    let y = m.forward(x);
    assert_eq!(y.shape().2, Const::<8>);
}

#[test]
fn builds_and_runs_in_f16_and_converts_between_dtypes() {
    use neural_arch::dfdx::dtypes::f16;
    let dev = Dev::seed_from_u64(4);
    let net32 = dev.build_module::<Net<6>, f32>();
    let net16 = net32.clone().to_dtype::<f16>();
    let x: Tensor<Rank3<1, 2, 3>, f32, Dev> = dev.sample_normal();
    let y32 = net32.forward(x.clone()).as_vec();
    let y16 = net16.forward(x.to_dtype::<f16>()).as_vec();
    for (a, b) in y32.iter().zip(&y16) {
        assert!((a - b.to_f32()).abs() < 0.05, "{y32:?} vs {y16:?}");
    }
    let built16 = dev.build_module::<TwoTower, f16>();
    assert_eq!(built16.num_trainable_params(), TwoTower::PARAMS);
}

#[test]
fn optimizer_zero_grads_and_reset_reach_every_parameter() {
    let dev = Dev::seed_from_u64(5);
    let mut net = dev.build_module::<Net<6>, f64>();
    let before = net.clone();
    let mut opt = Adam::new(
        &net,
        AdamConfig {
            lr: 1e-2,
            ..Default::default()
        },
    );
    let x: Tensor<Rank3<2, 3, 3>, f64, Dev> = dev.sample_normal();
    let mut grads = net.alloc_grads();
    let y = net.forward_mut(x.trace(grads));
    grads = y.square().mean::<Rank0, _>().backward();
    opt.update(&mut net, &grads)
        .expect("every parameter has a gradient");
    let (mut before, mut after) = (before, net.clone());
    for ((name, b), (_, a)) in named_values(&mut before)
        .iter()
        .zip(&named_values(&mut after))
    {
        assert_ne!(b, a, "{name} was not updated");
    }
    net.zero_grads(&mut grads);
    assert!(grads
        .get(&net.head.weight)
        .as_vec()
        .iter()
        .all(|g| *g == 0.0));
    net.reset_params();
    assert_ne!(net.proj.weight.as_vec(), before.proj.weight.as_vec());
    assert!(
        net.ln_f.weight.as_vec().iter().all(|w| *w == 1.0),
        "LayerNorm resets to ones"
    );
}

model! {
    /// Two inputs merged: a layer of another model that takes several inputs.
    pub struct Fuse<const D: usize> {
        a: Linear<D, D>,
        b: Linear<D, D>,
    }
    forward(x: [B, D], y: [B, D]) -> [B, D] {
        a(x) * b(y)
    }
}

model! {
    /// Calls the two-input `Fuse` with a shared input: `fuse(h, h)`.
    pub struct UsesFuse<const D: usize> {
        ln: LayerNorm<D>,
        fuse: Fuse<D>,
    }
    forward(x: [B, D]) -> [B, D] {
        let h = ln(x);
        x + fuse(h, h)
    }
}

#[test]
fn a_layer_takes_several_inputs_and_gradients_reach_both() {
    let dev = Dev::seed_from_u64(9);
    let mut m = dev.build_module::<UsesFuse<4>, f64>();
    assert_eq!(UsesFuse::<4>::PARAMS, m.num_trainable_params());
    let x: Tensor<Rank2<3, 4>, f64, Dev> = dev.sample_normal();
    let y = m.forward_mut(x.trace(m.alloc_grads()));
    let g = y.square().sum::<Rank0, _>().backward();
    for w in [
        g.get(&m.fuse.a.weight).as_vec(),
        g.get(&m.fuse.b.weight).as_vec(),
        g.get(&m.ln.weight).as_vec(),
    ] {
        assert!(w.iter().any(|v| *v != 0.0));
    }
    // The shared `h` feeds both branches: its gradient is the sum of both, as in PyTorch.
    let h = m.ln.forward(x.clone());
    let (ya, yb) = (m.fuse.a.forward(h.clone()), m.fuse.b.forward(h));
    let want = x
        .as_vec()
        .iter()
        .zip(ya.as_vec())
        .zip(yb.as_vec())
        .map(|((x, a), b)| x + a * b)
        .collect::<Vec<_>>();
    assert_eq!(m.forward(x).as_vec(), want);
}

model! {
    /// Token ids, a padding mask and a memory: every input kind, and every attention layer.
    pub struct Encoder<const D: usize> {
        wte: Embedding<50, D>,
        ln: RMSNorm<D>,
        attn: SelfAttention<D, 2>,
        cross: CrossAttention<D, 2>,
        gqa: GqaAttention<D, 4, 2, 2>,
        causal: CausalSelfAttention<D, 2>,
        mlp: SwiGLU<D, 12>,
    }
    forward(ids: usize[B, T], mask: bool[B, T], mem: [B, S, D]) -> [B, T, D] {
        let x = wte(ids);
        let x = x + attn(ln(x), mask);
        let x = x + cross(x, mem);
        let x = x + gqa(x);
        let x = causal(x);
        x + mlp(x)
    }
}

#[test]
fn tokens_masks_and_memories_flow_through_every_attention_layer() {
    let dev = Dev::seed_from_u64(21);
    let mut m = dev.build_module::<Encoder<8>, f64>();
    assert_eq!(Encoder::<8>::PARAMS, m.num_trainable_params());
    let ids: Tensor<(usize, usize), usize, Dev> =
        dev.tensor_from_vec(vec![1, 2, 3, 4, 5, 6], (2, 3));
    let mask: Tensor<(usize, usize), bool, Dev> =
        dev.tensor_from_vec(vec![true, true, false, true, true, true], (2, 3));
    let mem: Tensor<(usize, usize, Const<8>), f64, Dev> = dev.sample_normal_like(&(2, 4, Const));
    let report = check_param_grads(&mut m, |m, g| {
        let y = m
            .try_forward((
                ids.trace(g),
                mask.clone(),
                mem.retaped::<OwnedTape<f64, Dev>>(),
            ))
            .unwrap();
        y.square().sum::<Rank0, _>()
    });
    assert!(report.max_abs_err <= 1e-6, "{report}");
    let bad: Tensor<(usize, usize), usize, Dev> =
        dev.tensor_from_vec(vec![1, 2, 99, 4, 5, 6], (2, 3));
    let err = m.try_forward((bad, mask, mem)).map(|_| ()).unwrap_err();
    assert!(err.to_string().contains("token id 99"), "{err}");
}
