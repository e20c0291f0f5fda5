//! Code generation: the builder, the built struct, parameter traversal, forward passes,
//! `PARAMS` and the summary.

use crate::ast::{DimSpec, Forward, Kind, Model, ShapeSpec};
use crate::check::{Analysis, Scope, Shp, Sym};
use crate::graph::emit_body;
use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::Ident;

/// The name of the built struct: `Mlp` builds into `MlpModule`.
pub fn module_name(name: &Ident) -> Ident {
    format_ident!("{}Module", name)
}

fn camel(field: &Ident) -> Ident {
    let s = field.to_string();
    let mut out = String::new();
    let mut up = true;
    for c in s.trim_start_matches("r#").chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    format_ident!("L{}", out, span = field.span())
}

/// `Linear < 784 , H >` -> `Linear<784, H>`, for summaries and docs.
pub fn tidy(ty: &TokenStream) -> String {
    ty.to_string()
        .replace(" < ", "<")
        .replace("< ", "<")
        .replace(" <", "<")
        .replace(" >", ">")
        .replace(" ,", ",")
        .replace(" ;", ";")
        .replace("[ ", "[")
        .replace(" ]", "]")
}

/// A `format!` expression for a declared type, with the const parameters' values filled in:
/// `Linear<64, H>` prints as `Linear<64, 128>` in the summary of `Mlp<128>`.
fn with_values(text: &str, consts: &[Ident]) -> TokenStream {
    let mut fmt = String::new();
    let mut args = Vec::new();
    let mut word = String::new();
    let flush = |word: &mut String, fmt: &mut String, args: &mut Vec<Ident>| {
        if let Some(c) = consts.iter().find(|c| **c == word.as_str()) {
            fmt.push_str("{}");
            args.push(c.clone());
        } else {
            fmt.push_str(word);
        }
        word.clear();
    };
    for ch in text.chars() {
        if ch.is_alphanumeric() || ch == '_' {
            word.push(ch);
            continue;
        }
        flush(&mut word, &mut fmt, &mut args);
        match ch {
            '{' => fmt.push_str("{{"),
            '}' => fmt.push_str("}}"),
            c => fmt.push(c),
        }
    }
    flush(&mut word, &mut fmt, &mut args);
    quote!(::neural_arch::__private::format!(#fmt #(, #args)*))
}

/// A DSL shape as a dfdx shape type: `[B, 784]` -> `(B, Const<784>,)`.
pub fn shape_type(s: &ShapeSpec, scope: &Scope) -> TokenStream {
    let dims = s.dims.iter().map(|d| match d {
        DimSpec::Lit(n, span) => {
            let lit = proc_macro2::Literal::u128_unsuffixed(*n);
            quote_spanned!(*span=> ::neural_arch::__private::Const<#lit>)
        }
        DimSpec::Ident(i) if scope.consts.contains(&i.to_string()) => {
            quote_spanned!(i.span()=> ::neural_arch::__private::Const<#i>)
        }
        DimSpec::Ident(i) => quote!(#i),
    });
    quote!((#(#dims,)*))
}

/// The same tokens, all spanned at `span`, so that an error on the expression points there.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut t| {
            if let proc_macro2::TokenTree::Group(g) = &t {
                let mut ng = proc_macro2::Group::new(g.delimiter(), respan(g.stream(), span));
                ng.set_span(span);
                t = proc_macro2::TokenTree::Group(ng);
            } else {
                t.set_span(span);
            }
            t
        })
        .collect()
}

/// Wraps the final value of a forward body so that a wrong output shape is reported in the
/// DSL's words.
pub fn check_outputs(fwd: &Forward, scope: &Scope, tail: TokenStream) -> TokenStream {
    let check = |o: &ShapeSpec, v: TokenStream| {
        if o.dtype != Kind::Float {
            // A mask or ids passed on: the signature's type checks it.
            return v;
        }
        let ty = respan(shape_type(o, scope), o.span);
        let span = o.span;
        quote_spanned!(span=> {
            let __value = #v;
            ::neural_arch::__private::declared_output::<#ty, _, _, _, _>(__value)
        })
    };
    if fwd.tuple_output {
        let names: Vec<Ident> = (0..fwd.outputs.len())
            .map(|i| format_ident!("__out{}", i))
            .collect();
        let checks = fwd
            .outputs
            .iter()
            .zip(&names)
            .map(|(o, n)| check(o, quote!(#n)));
        quote!({ let (#(#names,)*) = #tail; (#(#checks,)*) })
    } else {
        check(&fwd.outputs[0], tail)
    }
}

fn shape_string(s: &Shp, consts: &[Ident]) -> TokenStream {
    let mut fmt = format!("{}[", s.dtype.prefix());
    let mut args = Vec::new();
    if !s.full {
        fmt.push_str("*, ");
    }
    for (i, d) in s.dims.iter().enumerate() {
        if i > 0 {
            fmt.push_str(", ");
        }
        match d {
            Sym::Param(p) => {
                fmt.push_str("{}");
                let id = consts
                    .iter()
                    .find(|c| **c == p)
                    .cloned()
                    .unwrap_or_else(|| format_ident!("{}", p));
                args.push(quote!(#id));
            }
            other => fmt.push_str(&other.to_string().replace('{', "{{").replace('}', "}}")),
        }
    }
    fmt.push(']');
    quote!(::neural_arch::__private::format!(#fmt #(, #args)*))
}

/// Everything for a model that passed the checks.
pub fn expand(model: &Model, analysis: &Analysis, scope: &Scope) -> TokenStream {
    let Model {
        attrs,
        vis,
        name,
        consts,
        fields,
        forward,
        checkpoint,
    } = model;
    let module = module_name(name);
    let p = quote!(::neural_arch::__private);
    let layer_tys: Vec<TokenStream> = fields
        .iter()
        .zip(&analysis.layer_types)
        .map(|(f, ty)| match &f.repeat {
            Some(n) => quote!(#p::Repeated<#ty, {#n}>),
            None => quote!(#ty),
        })
        .collect();
    let field_names: Vec<&Ident> = fields.iter().map(|f| &f.name).collect();
    let field_strs: Vec<String> = fields.iter().map(|f| f.key.clone()).collect();
    let params: Vec<Ident> = fields.iter().map(|f| camel(&f.name)).collect();
    let cparams = quote!(#(const #consts: usize,)*);
    let cargs = quote!(#(#consts),*);
    let builder = quote!(#name<#cargs>);
    let built_params = quote!(#(#p::Built<#layer_tys, __E, __Dev>),*);
    let built = quote!(#module<#builder, __E, #built_params>);

    let field_docs = fields.iter().zip(&layer_tys).map(|(f, ty)| {
        let docs: Vec<_> = f
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("doc"))
            .collect();
        if docs.is_empty() {
            let text = format!(" Layer `{}`: `{}`.", f.name, tidy(ty));
            quote!(#[doc = #text])
        } else {
            quote!(#(#docs)*)
        }
    });
    let module_doc = format!(" The built form of [`{name}`]: its layers' parameters on a device.");

    // Parameter traversal, in declaration order, as nested pairs (dfdx implements
    // `ModuleFields` for small tuples only).
    let mut visit = quote!(());
    let mut pattern = quote!(());
    for (f, s) in field_names.iter().zip(&field_strs).rev() {
        visit = quote!((Self::module(#s, |s| &s.#f, |s| &mut s.#f), #visit));
        pattern = quote!((#f, #pattern));
    }

    let summary_rows = fields.iter().zip(&layer_tys).zip(&analysis.outputs).map(|((f, ty), out)| {
        let fname = f.key.clone();
        let tystr = with_values(&match &f.repeat {
            Some(n) => {
                let inner = &f.layer;
                format!("[{}; {}]", tidy(&quote!(#inner)), tidy(&quote!(#n)))
            }
            // As written: the sizes the macro filled in show in the output column.
            None => {
                let written = &f.layer;
                tidy(&quote!(#written))
            }
        }, consts);
        let out = match out {
            Some(s) => shape_string(s, consts),
            None => quote!(#p::String::from("?")),
        };
        quote! {
            rows.push(#p::SummaryRow {
                depth,
                name: #p::format!("{}{}", prefix, #fname),
                layer: #tystr,
                output: #out,
                params: <#ty as #p::LayerInfo>::PARAMS,
            });
            rows.extend(<#ty as #p::LayerInfo>::children(&#p::format!("{}{}", prefix, #fname), depth + 1));
        }
    });
    let inputs_str = match forward {
        Some(fwd) => fwd
            .params
            .iter()
            .map(|(n, s)| format!("{n}: {}", scope.shape_of(s)))
            .collect::<Vec<_>>()
            .join(", "),
        None => String::new(),
    };
    let model_str = if consts.is_empty() {
        let n = name.to_string();
        quote!(#p::String::from(#n))
    } else {
        with_values(&tidy(&quote!(#name<#cargs>)), consts)
    };
    let const_checks = analysis.const_checks.iter().map(|c| {
        let dim = |s: &Sym| match s {
            Sym::Lit(n) => {
                let l = proc_macro2::Literal::u128_unsuffixed(*n);
                quote!(#l)
            }
            other => {
                let i = format_ident!("{}", other.to_string());
                quote!(#i)
            }
        };
        let (l, r) = (dim(&c.lhs), dim(&c.rhs));
        let msg = &c.message;
        let span = c.span;
        quote_spanned!(span=> ::core::assert!(#r != 0 && #l % #r == 0, #msg);)
    });

    let base = match &checkpoint.base {
        Some(b) => quote!(::core::option::Option::Some(#p::String::from(#b))),
        None => quote!(::core::option::Option::None),
    };
    let transposed = &checkpoint.transposed;
    let ignored = &checkpoint.ignored;
    let forward_impls = match forward {
        Some(fwd) => graph_impls(model, fwd, analysis, scope, &built, &cparams),
        None => chain_impls(model, &builder, &params, &cparams),
    };
    let struct_generics = quote!(__Model, __Elem, #(#params),*);

    quote! {
        #(#attrs)*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #vis struct #name<#cparams>;

        #[doc = #module_doc]
        #[derive(Debug, Clone)]
        #[allow(non_camel_case_types)]
        #vis struct #module<#struct_generics> {
            #( #field_docs pub #field_names: #params, )*
            // The element type is named here so that every impl constrains it, also when the
            // inputs are token ids (`usize`) and the layers name it only through projections.
            __model: ::core::marker::PhantomData<(__Model, __Elem)>,
        }

        const _: () = {
            impl<#cparams> #builder {
                /// Trainable parameters of the model, computed at compile time.
                pub const PARAMS: usize = 0 #(+ <#layer_tys as #p::LayerInfo>::PARAMS)*;

                #[doc(hidden)]
                const __CONST_CHECKS: () = { #(#const_checks)* };

                /// The layer table: names, output shapes and parameter counts.
                pub fn summary() -> #p::Summary {
                    #p::Summary {
                        model: #model_str,
                        inputs: #p::String::from(#inputs_str),
                        rows: <Self as #p::LayerInfo>::children("", 0),
                        total_params: Self::PARAMS,
                    }
                }
            }

            impl<#cparams> #p::LayerInfo for #builder {
                const PARAMS: usize = Self::PARAMS;
                #[allow(clippy::let_unit_value)]
                const CHECKS: () = {
                    let () = Self::__CONST_CHECKS;
                    #( let () = <#layer_tys as #p::LayerInfo>::CHECKS; )*
                };
                fn children(prefix: &str, depth: usize) -> #p::Vec<#p::SummaryRow> {
                    let prefix = if prefix.is_empty() { #p::String::new() } else { #p::format!("{}.", prefix) };
                    let mut rows = #p::Vec::new();
                    #(#summary_rows)*
                    rows
                }
            }

            impl<#cparams __E: #p::Elem, __Dev: #p::Device<__E>> #p::BuildOnDevice<__Dev, __E> for #builder
            where
                #( #layer_tys: #p::BuildOnDevice<__Dev, __E>, )*
                #built: ::neural_arch::dfdx::nn::BuildModule<__Dev, __E>,
            {
                type Built = #built;
                fn try_build_on_device(device: &__Dev) -> ::core::result::Result<Self::Built, <__Dev as ::neural_arch::dfdx::tensor::HasErr>::Err> {
                    #[allow(clippy::let_unit_value)]
                    let () = <Self as #p::LayerInfo>::CHECKS;
                    <Self::Built as ::neural_arch::dfdx::nn::BuildModule<__Dev, __E>>::try_build(device)
                }
            }

            impl<__Model, #(#params,)* __E: #p::Dtype, __Dev: #p::Device<__E>> #p::TensorCollection<__E, __Dev>
                for #module<__Model, __E, #(#params),*>
            where
                #( #params: #p::TensorCollection<__E, __Dev>, )*
            {
                type To<__E2: #p::Dtype, __Dev2: #p::Device<__E2>> =
                    #module<__Model, __E2, #(<#params as #p::TensorCollection<__E, __Dev>>::To<__E2, __Dev2>),*>;

                fn iter_tensors<__V: #p::ModuleVisitor<Self, __E, __Dev>>(
                    visitor: &mut __V,
                ) -> ::core::result::Result<::core::option::Option<Self::To<__V::E2, __V::D2>>, __V::Err> {
                    visitor.visit_fields(#visit, |#pattern| #module {
                        #(#field_names,)*
                        __model: ::core::marker::PhantomData,
                    })
                }
            }

            #forward_impls

            impl<__Model, __E, #(#params),*> #module<__Model, __E, #(#params),*> {
                /// How upstream checkpoints of this model differ from its keys (see
                /// [`LoadOptions`](::neural_arch::checkpoint::LoadOptions)).
                pub fn load_options() -> ::neural_arch::checkpoint::LoadOptions {
                    ::neural_arch::checkpoint::LoadOptions {
                        base_prefix: #base,
                        transposed: #p::vec![#(#p::String::from(#transposed)),*],
                        ignored: #p::vec![#(#p::String::from(#ignored)),*],
                        fresh: #p::vec![],
                    }
                }

                /// Loads the weights from a safetensors file with upstream key names; a missing,
                /// unexpected or wrongly shaped tensor is an error naming it, and leaves the
                /// model unchanged.
                pub fn load_safetensors<__Dev: #p::Device<__E>>(
                    &mut self,
                    path: impl ::core::convert::AsRef<::std::path::Path>,
                ) -> ::core::result::Result<::neural_arch::checkpoint::LoadReport, #p::Error>
                where
                    __E: ::neural_arch::checkpoint::CheckpointElem,
                    Self: #p::TensorCollection<__E, __Dev>,
                {
                    ::neural_arch::checkpoint::load_safetensors(self, path, &Self::load_options())
                }

                /// Saves every tensor under its key, atomically, in the upstream layout (the
                /// `transposed` tensors transposed back), so that it loads back as it was.
                pub fn save_safetensors<__Dev: #p::Device<__E>>(
                    &self,
                    path: impl ::core::convert::AsRef<::std::path::Path>,
                ) -> ::core::result::Result<(), #p::Error>
                where
                    __E: ::neural_arch::checkpoint::CheckpointElem,
                    Self: #p::TensorCollection<__E, __Dev>,
                {
                    ::neural_arch::checkpoint::save_safetensors_with(self, path, &Self::load_options())
                }
            }
        };
    }
}

/// A model without `forward`: the layers run in declaration order, for any input they accept.
fn chain_impls(
    model: &Model,
    builder: &TokenStream,
    params: &[Ident],
    _cparams: &TokenStream,
) -> TokenStream {
    let p = quote!(::neural_arch::__private);
    let consts = &model.consts;
    let module = module_name(&model.name);
    let names: Vec<&Ident> = model.fields.iter().map(|f| &f.name).collect();
    let mut impls = TokenStream::new();
    for (tr, out, method, recv, call) in [
        (
            quote!(#p::Module),
            quote!(#p::Out),
            quote!(try_forward),
            quote!(&self),
            quote!(try_forward),
        ),
        (
            quote!(#p::ModuleMut),
            quote!(#p::OutMut),
            quote!(try_forward_mut),
            quote!(&mut self),
            quote!(try_forward_mut),
        ),
    ] {
        let mut bounds = Vec::new();
        let mut x = quote!(__X);
        for l in params.iter() {
            bounds.push(quote!(#l: #tr<#x>));
            bounds.push(quote!(<#l as #tr<#x>>::Error: ::core::convert::Into<#p::Error>));
            x = quote!(#out<#l, #x>);
        }
        let steps = names
            .iter()
            .map(|n| quote!(let x = self.#n.#call(x).map_err(::core::convert::Into::into)?;));
        impls.extend(quote! {
            #[diagnostic::do_not_recommend]
            impl<#(const #consts: usize,)* __X, __Elem, #(#params),*> #tr<__X> for #module<#builder, __Elem, #(#params),*>
            where #(#bounds,)*
            {
                type Output = #x;
                type Error = #p::Error;
                fn #method(#recv, x: __X) -> ::core::result::Result<Self::Output, Self::Error> {
                    #(#steps)*
                    Ok(x)
                }
            }
        });
    }
    // The chain is generic over its input, and recomputation needs a tensor: such a model
    // declares its forward signature.
    for f in model.fields.iter().filter(|f| f.recompute) {
        let span = f.name.span();
        impls.extend(quote_spanned! {span=> ::core::compile_error!(
            "`#[recompute]` needs the model's input shape: declare it with \
             `forward(x: [..]) -> [..];` (no body: the layers still run in order)"
        );});
    }
    impls
}

/// A model with `forward`: concrete impls for the declared input shapes, with per-layer check
/// traits whose messages name the layer.
fn graph_impls(
    model: &Model,
    fwd: &Forward,
    analysis: &Analysis,
    scope: &Scope,
    built: &TokenStream,
    cparams: &TokenStream,
) -> TokenStream {
    let p = quote!(::neural_arch::__private);
    let synthesized;
    let fwd = if fwd.body.is_some() {
        fwd
    } else {
        synthesized = synthesize_chain(model, fwd);
        &synthesized
    };
    let rt = &analysis.runtime_dims;
    let in_tys: Vec<TokenStream> = fwd
        .params
        .iter()
        .map(|(_, s)| {
            let st = shape_type(s, scope);
            match s.dtype {
                Kind::Float => quote!(#p::Tensor<#st, __E, __Dev, __Tp>),
                Kind::Ids => quote!(#p::Tensor<#st, usize, __Dev, __Tp>),
                // Masks carry no gradient, so no tape.
                Kind::Mask => quote!(#p::Tensor<#st, bool, __Dev>),
            }
        })
        .collect();
    let in_names: Vec<&Ident> = fwd.params.iter().map(|(n, _)| n).collect();
    let (in_ty, in_pat) = if in_tys.len() == 1 {
        (in_tys[0].clone(), quote!(#(#in_names)*))
    } else {
        (quote!((#(#in_tys,)*)), quote!((#(#in_names,)*)))
    };
    let out_tys: Vec<TokenStream> = fwd
        .outputs
        .iter()
        .map(|s| {
            let st = shape_type(s, scope);
            match s.dtype {
                Kind::Float => quote!(#p::Tensor<#st, __E, __Dev, __Tp>),
                Kind::Ids => quote!(#p::Tensor<#st, usize, __Dev, __Tp>),
                // A mask passed on, as a repeated block passes its padding mask to the next.
                Kind::Mask => quote!(#p::Tensor<#st, bool, __Dev>),
            }
        })
        .collect();
    let out_ty = if fwd.tuple_output {
        quote!((#(#out_tys,)*))
    } else {
        out_tys[0].clone()
    };
    let generics = quote!(#cparams __E: #p::Elem, __Dev: #p::Device<__E>, #(#rt: #p::Dim,)* __Tp: #p::Tape<__E, __Dev> + ::neural_arch::dfdx::tensor::Merge<__Tp>);
    let (body, traits) = emit_body(model, fwd, analysis, scope, false);
    let (body_mut, _) = emit_body(model, fwd, analysis, scope, true);

    quote! {
        #(#traits)*

        impl<#generics> #p::Module<#in_ty> for #built
        where
            #p::Error: ::core::convert::From<#p::Err<__Dev>>,
        {
            type Output = #out_ty;
            type Error = #p::Error;
            #[allow(unused_variables, clippy::let_and_return)]
            fn try_forward(&self, __input: #in_ty) -> ::core::result::Result<Self::Output, Self::Error> {
                let #in_pat = __input;
                #body
            }
        }

        impl<#generics> #p::ModuleMut<#in_ty> for #built
        where
            #p::Error: ::core::convert::From<#p::Err<__Dev>>,
        {
            type Output = #out_ty;
            type Error = #p::Error;
            #[allow(unused_variables, clippy::let_and_return)]
            fn try_forward_mut(&mut self, __input: #in_ty) -> ::core::result::Result<Self::Output, Self::Error> {
                let #in_pat = __input;
                #body_mut
            }
        }
    }
}

/// `forward(x: [..]) -> [..];` without a body: `{ let x = l1(x); let x = l2(x); x }`, with each
/// call spanned on its layer's declaration.
fn synthesize_chain(model: &Model, fwd: &Forward) -> Forward {
    let x = &fwd.params[0].0;
    let stmts = model.fields.iter().map(|f| {
        let n = &f.name;
        let span: Span = f.span.0;
        let call = quote_spanned!(span=> #n(#x));
        quote!(let #x = #call;)
    });
    let block: syn::Block = syn::parse_quote!({ #(#stmts)* #x });
    Forward {
        kw: fwd.kw.clone(),
        params: fwd.params.clone(),
        outputs: fwd.outputs.clone(),
        tuple_output: fwd.tuple_output,
        body: Some(block),
    }
}

/// What a model with errors still defines, so that the code using it does not fail too.
pub fn fallback(model: &Model) -> TokenStream {
    let Model {
        attrs,
        vis,
        name,
        consts,
        ..
    } = model;
    let p = quote!(::neural_arch::__private);
    let docs: Vec<_> = attrs.iter().filter(|a| a.path().is_ident("doc")).collect();
    quote! {
        #(#docs)*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #vis struct #name<#(const #consts: usize),*>;
        const _: () = {
            impl<#(const #consts: usize),*> #name<#(#consts),*> {
                /// Unknown: the declaration has errors.
                pub const PARAMS: usize = 0;
            }
            impl<#(const #consts: usize,)* __E: #p::Elem, __Dev: #p::Device<__E>> #p::BuildOnDevice<__Dev, __E> for #name<#(#consts),*> {
                type Built = #p::Fallback;
            }
        };
    }
}
