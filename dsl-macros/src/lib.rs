//! The `model!` procedural macro of [neural-arch](https://docs.rs/neural-arch).
//!
//! Use it through `neural_arch::model!`; the grammar is documented on [`model!`].
#![deny(missing_docs)]

mod ast;
mod check;
mod expand;
mod graph;

use proc_macro::TokenStream;

/// Declares a neural network as a list of named layers.
///
/// ```text
/// model! {
///     /// docs
///     pub struct Name<const P: usize, ...> {
///         layer_name: LayerType,            // one layer
///         blocks: [BlockType; N],           // N identical layers, run in order
///         ...
///     }
///     // optional:
///     forward(x: [B, 784]) -> [B, 10];      // a chain with a declared signature
///     forward(x: [B, T, D], y: [B, D]) -> ([B, T, D], [B, D]) {
///         let h = x + attn(ln_1(x));        // a graph: calls, + - *, let, tuples
///         (h, y)
///     }
/// }
/// ```
///
/// It generates `Name<P..>` (the builder: `dev.build_module::<Name<..>, f32>()`), `NameModule`
/// (the built module, one public field per layer), parameter traversal for dfdx (optimizers,
/// `ZeroGrads`, `ResetParams`, `ToDevice`, `ToDtype`, `NumParams`, safetensors, with checkpoint
/// keys `layer.sub.weight`), `Module` (inference) and `ModuleMut` (training), the compile-time
/// `Name::PARAMS` and `Name::summary()`.
///
/// Shapes: `[B, T, 768]` lists the dimensions; a number or a const parameter is fixed, any other
/// name is a runtime size (batch, sequence). Braced arithmetic on literals is evaluated:
/// `[B, {28 * 28}]`. Without a `forward`, the layers run as a chain for any input they accept.
/// Shape mistakes are compile errors on the offending layer.
#[proc_macro]
pub fn model(input: TokenStream) -> TokenStream {
    let model = match syn::parse::<ast::Model>(input) {
        Ok(m) => m,
        Err(e) => return e.to_compile_error().into(),
    };
    let mut cx = check::Ctxt::default();
    let analysis = check::check(&model, &mut cx);
    let scope = check::Scope {
        consts: model.consts.iter().map(|c| c.to_string()).collect(),
        runtime: analysis
            .runtime_dims
            .iter()
            .map(|i| i.to_string())
            .collect(),
        fields: model
            .fields
            .iter()
            .map(|f| (f.name.to_string(), f))
            .collect(),
    };
    match cx.into_result() {
        Ok(()) => expand::expand(&model, &analysis, &scope).into(),
        Err(e) => {
            let mut out = e.to_compile_error();
            out.extend(expand::fallback(&model));
            out.into()
        }
    }
}
