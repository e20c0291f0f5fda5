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
///     #[checkpoint(base = "transformer.", transposed("c_attn.weight"), ignored("attn.bias"))]
///     pub struct Name<const P: usize, ...> {
///         layer_name: LayerType,            // one layer
///         blocks: [BlockType; N],           // N identical layers, run in order
///         #[key = "LayerNorm"]              // checkpoint key other than the field name
///         layer_norm: LayerNorm<768>,
///         ...
///     }
///     // optional:
///     forward(x: [B, 784]) -> [B, 10];      // a chain with a declared signature
///     forward(x: [B, T, D], y: [B, D]) -> ([B, T, D], [B, D]) {
///         let h = x + attn(ln_1(x));        // a graph: calls, + - *, let, tuples
///         (h, wte.unembed(y))               // a layer's method: a tied output layer
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
/// Checkpoints: the module gets `load_safetensors(path)` and `save_safetensors(path)` under the
/// layer names (`h.0.attn.c_attn.weight`); `#[key = ".."]` gives a layer the upstream name a Rust
/// field cannot have (`self`, `LayerNorm`), and `#[checkpoint(..)]` states how upstream files
/// differ: a `base` prefix a base-model file lacks, 2-D tensors stored `transposed`, and
/// `ignored` buffers (patterns match a dotted key suffix, `*` one segment).
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
    fn layer_norm_takes_an_epsilon_exponent() -> syn::Result<()> {
        assert!(
            errors("struct M<const D: usize> { a: Linear<D, D>, b: LayerNorm<D, 12>, }")?
                .is_empty()
        );
        let errs = errors("struct M { a: Linear<8, 4>, b: LayerNorm<8, 12>, }")?;
        assert_eq!(
            errs,
            ["layer `b` expects input `[*, 8]`, but `a` produces `[*, 4]`"]
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

    /// The layer types after the macro filled in computed sizes, and the summary shapes.
    fn analysed(src: &str) -> syn::Result<(Vec<String>, Vec<String>)> {
        let model: crate::ast::Model = syn::parse_str(src)?;
        let mut cx = Ctxt::default();
        let a = crate::check::check(&model, &mut cx);
        let types = a
            .layer_types
            .iter()
            .map(|t| tidy(&quote::quote!(#t)))
            .collect();
        let shapes = a
            .outputs
            .iter()
            .map(|o| o.as_ref().map(|s| s.to_string()).unwrap_or_default())
            .collect();
        cx.into_result()?;
        Ok((types, shapes))
    }

    #[test]
    fn convolution_and_pooling_sizes_are_computed_and_written_into_the_types() -> syn::Result<()> {
        let (types, shapes) = analysed(
            "struct Cnn {
                c1: Conv2d<1, 8, 3, 1, 1>, p1: MaxPool2d<2>,
                c2: Conv2d<8, 16, 5, 2, 0, 1, 2>, gap: GlobalAvgPool, fc: Linear<16, 10>,
            }
            forward(x: [B, 1, 28, 28]) -> [B, 10];",
        )?;
        assert_eq!(
            shapes,
            [
                "[B, 8, 28, 28]",
                "[B, 8, 14, 14]",
                "[B, 16, 5, 5]",
                "[B, 16]",
                "[B, 10]"
            ]
        );
        assert!(types[0].ends_with("Conv2d<1, 8, 3, 1, 1, 1, 1, true, :: neural_arch :: __private :: Const<28>, :: neural_arch :: __private :: Const<28>>"), "{}", types[0]);
        assert!(types[1].ends_with("MaxPool2d<2, 2, 0, :: neural_arch :: __private :: Const<14>, :: neural_arch :: __private :: Const<14>>"), "{}", types[1]);
        Ok(())
    }

    #[test]
    fn image_mistakes_are_reported() -> syn::Result<()> {
        let e = errors(
            "struct M { c: Conv2d<3, 8, 3>, } forward(x: [B, 1, 28, 28]) -> [B, 8, 26, 26];",
        )?;
        assert_eq!(
            e,
            ["layer `c` expects input `[B, 3, H, W]`, but the input `x` is `[B, 1, 28, 28]`"]
        );
        let e =
            errors("struct M { c: Conv2d<1, 8, 7>, } forward(x: [B, 1, 5, 5]) -> [B, 8, 1, 1];")?;
        assert_eq!(e.len(), 1);
        assert!(
            e[0].contains("the kernel 7 is larger than the height 5"),
            "{e:?}"
        );
        let e = errors("struct M { c: Conv2d<6, 8, 3, 1, 0, 1, 4>, } forward(x: [B, 6, 8, 8]) -> [B, 8, 6, 6];")?;
        assert!(
            e[0].contains("the groups `4` must divide the input channels `6`"),
            "{e:?}"
        );
        let e = errors(
            "struct M { p: PatchEmbed<3, 64, 16>, } forward(x: [B, 3, 200, 224]) -> [B, 182, 64];",
        )?;
        assert!(
            e[0].contains("the patch size `16` must divide the image height `200`"),
            "{e:?}"
        );
        Ok(())
    }

    #[test]
    fn token_ids_go_through_an_embedding() -> syn::Result<()> {
        let (_, shapes) = analysed(
            "struct Lm { wte: Embedding<100, 16>, wpe: PositionalEmbedding<32, 16>, head: Linear<16, 100>, }
             forward(ids: usize[B, T]) -> [B, T, 100];",
        )?;
        assert_eq!(shapes, ["[B, T, 16]", "[B, T, 16]", "[B, T, 100]"]);
        let e = errors("struct M { fc: Linear<16, 4>, } forward(ids: usize[B, 16]) -> [B, 4];")?;
        assert!(
            e[0].contains("takes float features, but the input `ids` is token ids `usize[B, 16]`"),
            "{e:?}"
        );
        Ok(())
    }

    /// A rule on generic sizes cannot be decided here: it becomes a const assertion, which the
    /// compiler evaluates (and reports with this message) when the model is instantiated. The
    /// build-time failure itself is `ui-tests`' `compile_fail` doctests.
    #[test]
    fn generic_size_rules_are_left_for_the_build() -> syn::Result<()> {
        fn checks(src: &str) -> syn::Result<Vec<(String, String, String)>> {
            let model: crate::ast::Model = syn::parse_str(src)?;
            let mut cx = Ctxt::default();
            let a = crate::check::check(&model, &mut cx);
            cx.into_result()?;
            Ok(a.const_checks
                .iter()
                .map(|c| (c.lhs.to_string(), c.rhs.to_string(), c.message.clone()))
                .collect())
        }
        assert_eq!(
            checks(
                "struct Encoder<const D: usize, const H: usize> {
                     proj: Linear<D, D>,
                     attn: SelfAttention<D, H>,
                 }
                 forward(x: [B, S, D]) -> [B, S, D];"
            )?,
            [(
                "D".to_string(),
                "H".to_string(),
                "layer `attn`: the number of heads `H` must divide the width `D`".to_string()
            )]
        );
        // Known sizes are decided by the macro: nothing is left for the compiler.
        assert_eq!(
            checks(
                "struct E { attn: SelfAttention<12, 4>, } forward(x: [B, S, 12]) -> [B, S, 12];"
            )?,
            []
        );
        Ok(())
    }
}
