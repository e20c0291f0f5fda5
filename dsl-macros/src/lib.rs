//! The `model!` procedural macro of [neural-arch](https://docs.rs/neural-arch).
//!
//! Use it through `neural_arch::model!`; the grammar is documented on [`model!`].
#![deny(missing_docs)]

mod ast;
mod check;
mod expand;
mod graph;
mod rules;

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
    let scope = check::Scope::new(&model, &analysis.runtime_dims);
    match cx.into_result() {
        Ok(()) => expand::expand(&model, &analysis, &scope).into(),
        Err(e) => {
            let mut out = e.to_compile_error();
            out.extend(expand::fallback(&model));
            out.into()
        }
    }
}

#[cfg(test)]
mod tests {
    // Tests return `syn::Result` rather than unwrapping: the crate has no `unwrap` anywhere.
    use crate::check::{eval_const, Ctxt};
    use crate::expand::tidy;

    fn value(s: &str) -> syn::Result<Option<u128>> {
        Ok(eval_const(&syn::parse_str(s)?))
    }

    #[test]
    fn literal_arithmetic_is_evaluated() -> syn::Result<()> {
        assert_eq!(value("28 * 28")?, Some(784));
        assert_eq!(value("{ (32 - 4) / 2 + 1 }")?, Some(15));
        assert_eq!(value("7 % 4")?, Some(3));
        assert_eq!(value("H * 2")?, None);
        assert_eq!(value("3 - 4")?, None, "underflow is not a size");
        assert_eq!(value("1 / 0")?, None);
        Ok(())
    }

    #[test]
    fn types_print_as_written() -> syn::Result<()> {
        let ty: syn::Type = syn::parse_str("Linear<784, { 28 * 28 }>")?;
        assert_eq!(tidy(&quote::quote!(#ty)), "Linear<784, { 28 * 28 }>");
        Ok(())
    }

    fn errors(src: &str) -> syn::Result<Vec<String>> {
        let model: crate::ast::Model = syn::parse_str(src)?;
        let mut cx = Ctxt::default();
        crate::check::check(&model, &mut cx);
        Ok(match cx.into_result() {
            Ok(()) => Vec::new(),
            Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
        })
    }

    #[test]
    fn every_mistake_is_collected() -> syn::Result<()> {
        let errs = errors(
            "struct Net { fc1: Linear<784, 128>, fc2: Linear<256, 10>, fc1: ReLU, }
             forward(x: [B, 784]) -> [B, 20];",
        )?;
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].contains("duplicate layer name `fc1`"), "{errs:?}");
        assert!(errs
            .iter()
            .any(|e| e.contains("layer `fc2` expects input `[*, 256]`")));
        assert!(errs
            .iter()
            .any(|e| e.contains("declares the output `[B, 20]`")));
        Ok(())
    }

    #[test]
    fn symbolic_dims_follow_the_layers() -> syn::Result<()> {
        assert!(
            errors("struct M<const D: usize> { a: Linear<D, D>, b: LayerNorm<D>, }")?.is_empty()
        );
        let errs = errors(
            "struct M<const D: usize, const F: usize> { a: Linear<D, F>, b: LayerNorm<D>, }",
        )?;
        assert_eq!(
            errs,
            ["layer `b` expects input `[*, D]`, but `a` produces `[*, F]`"]
        );
        Ok(())
    }

    #[test]
    fn unknown_layers_are_left_to_the_compiler() -> syn::Result<()> {
        assert!(
            errors("struct M { a: Linear<4, 8>, b: MyLayer<3>, c: Linear<5, 2>, }")?.is_empty()
        );
        Ok(())
    }
}
