//! `forward` bodies: checking shapes through them, and translating them to Rust.
//!
//! A body is a list of `let` bindings and a final expression over: input and variable names,
//! layer calls `name(x)` / `name(a, b)`, element-wise `+ - *`, tuples and parentheses.
//! Tensors move in Rust; a variable used several times is handed out as a tape-less copy
//! (`with_empty_tape`) at every use but its last, which takes the gradient tape. dfdx sorts tape
//! operations by time when it merges them, so the gradient of every use reaches the variable.

use crate::ast::{Field, Forward, Model};
use crate::check::{check_output, Analysis, Ctxt, Scope, Shp, Source, Val};
use crate::expand::tidy;
use crate::rules::apply_layer;
use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use std::collections::HashMap;
use syn::spanned::Spanned;
use syn::{BinOp, Expr, Pat, Stmt, Type};

/// One pass over a body; the same walk checks, counts variable uses, and emits code, so that
/// the three always agree on evaluation order.
struct Walk<'a, 'm> {
    scope: &'a Scope<'m>,
    /// name -> (binding id, value)
    /// name -> (binding id, value, what produced it)
    vars: HashMap<String, (usize, Val, String)>,
    next_id: usize,
    /// binding id -> uses left (emit pass) or seen (count pass)
    uses: HashMap<usize, usize>,
    counting: bool,
    train: bool,
    layer_types: &'a mut Vec<Type>,
    outputs: &'a mut Vec<Option<Shp>>,
    field_index: HashMap<String, usize>,
    /// Layer calls so far: each gets its own check trait.
    calls: usize,
    /// What produced each element of the last tuple built, for messages about outputs.
    tuple_sources: Vec<Source>,
    /// The check traits (emitted by the inference pass only).
    traits: Vec<TokenStream>,
}

impl Walk<'_, '_> {
    fn bind(&mut self, name: &str, val: Val, source: String) {
        self.vars
            .insert(name.to_string(), (self.next_id, val, source));
        self.next_id += 1;
    }

    fn expr(&mut self, e: &Expr, cx: &mut Ctxt) -> (Val, TokenStream, Source) {
        match e {
            Expr::Paren(p) => self.expr(&p.expr, cx),
            Expr::Group(g) => self.expr(&g.expr, cx),
            Expr::Path(p) if p.path.get_ident().is_some() && p.qself.is_none() => {
                let ident = &p.path.segments[0].ident;
                let name = ident.to_string();
                let Some((id, val, source)) = self.vars.get(&name).cloned() else {
                    let what = if self.field_index.contains_key(&name) {
                        format!("`{name}` is a layer: call it, `{name}(x)`")
                    } else {
                        format!("unknown variable `{name}`")
                    };
                    cx.error(ident.span(), what);
                    return (
                        Val::Unknown,
                        TokenStream::new(),
                        Source(format!("`{name}`")),
                    );
                };
                let tokens = if self.counting {
                    *self.uses.entry(id).or_default() += 1;
                    quote!(#ident)
                } else {
                    let left = self.uses.entry(id).or_default();
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        quote!(#ident)
                    } else {
                        quote!(::neural_arch::__private::WithEmptyTape::with_empty_tape(&#ident))
                    }
                };
                (val, tokens, Source(source))
            }
            Expr::Call(c) => self.call(c, cx),
            Expr::MethodCall(m) => self.method_call(m, cx),
            Expr::Binary(b) => {
                let (method, sym) = match b.op {
                    BinOp::Add(_) => (format_ident!("add"), "+"),
                    BinOp::Sub(_) => (format_ident!("sub"), "-"),
                    BinOp::Mul(_) => (format_ident!("mul"), "*"),
                    _ => {
                        cx.error(
                            b.op.span(),
                            "only `+`, `-` and `*` (element-wise) are allowed here",
                        );
                        return (Val::Unknown, TokenStream::new(), Source("this".into()));
                    }
                };
                let (lv, lt, ls) = self.expr(&b.left, cx);
                let (rv, rt, rs) = self.expr(&b.right, cx);
                let val = match (&lv, &rv) {
                    (Val::Known(l), Val::Known(r)) => {
                        let equal_rank = l.full && r.full && l.dims.len() != r.dims.len();
                        let n = l.dims.len().min(r.dims.len());
                        let differ = l.dims[l.dims.len() - n..]
                            .iter()
                            .zip(&r.dims[r.dims.len() - n..])
                            .any(|(a, b)| {
                                a != b
                                    && !matches!(
                                        (a, b),
                                        (crate::check::Sym::Opaque(_), _)
                                            | (_, crate::check::Sym::Opaque(_))
                                    )
                            });
                        if equal_rank || differ {
                            cx.error(
                                b.op.span(),
                                format!(
                                    "`{sym}` needs two tensors of the same shape, but {} `{l}` and {} `{r}`",
                                    ls.produces(), rs.produces()
                                ),
                            );
                        }
                        if l.full {
                            lv.clone()
                        } else {
                            rv.clone()
                        }
                    }
                    (Val::Known(_), _) => lv.clone(),
                    _ => rv.clone(),
                };
                let span = b.op.span();
                // Operands first, in locals: the call then spans only the operator.
                let tokens = quote_spanned! {span=>
                    {
                        let __lhs = #lt;
                        let __rhs = #rt;
                        ::neural_arch::__private::#method((__lhs, __rhs))
                            .map_err(::neural_arch::__private::Error::from)?
                    }
                };
                (val, tokens, Source(format!("`{sym}`")))
            }
            Expr::Tuple(t) => {
                let mut vals = Vec::new();
                let mut toks = Vec::new();
                let mut sources = Vec::new();
                for el in &t.elems {
                    let (v, tk, src) = self.expr(el, cx);
                    vals.push(v);
                    toks.push(tk);
                    sources.push(src);
                }
                self.tuple_sources = sources;
                (
                    Val::Tuple(vals),
                    quote!((#(#toks,)*)),
                    Source("the tuple".into()),
                )
            }
            other => {
                cx.error(
                    other.span(),
                    "a forward body may use: variables, layer calls `layer(x)`, layer methods \
                     `layer.method(x)`, `+`, `-`, `*`, tuples and parentheses",
                );
                (Val::Unknown, TokenStream::new(), Source("this".into()))
            }
        }
    }

    /// `layer.method(x, ..)`: a method of a layer other than its forward, such as a tied output
    /// projection `wte.unembed(h)`. The macro cannot see its shapes; the compiler checks them.
    fn method_call(
        &mut self,
        m: &syn::ExprMethodCall,
        cx: &mut Ctxt,
    ) -> (Val, TokenStream, Source) {
        let field = match &*m.receiver {
            Expr::Path(p) if p.qself.is_none() => p.path.get_ident().cloned(),
            _ => None,
        };
        let Some(field) = field.filter(|f| self.field_index.contains_key(&f.to_string())) else {
            let method = &m.method;
            cx.error(
                m.receiver.span(),
                format!(
                    "`.{method}()` is called on a value, but methods are called on layers of \
                     this model (`wte.unembed(h)`); for an operation on a tensor, declare a \
                     layer (`act: ReLU`) and call it (`act(x)`)"
                ),
            );
            return (Val::Unknown, TokenStream::new(), Source("this".into()));
        };
        let mut toks = Vec::new();
        for a in &m.args {
            let (_, t, _) = self.expr(a, cx);
            toks.push(t);
        }
        let method = &m.method;
        let span = method.span();
        let tokens = quote_spanned! {span=>
            self.#field.#method(#(#toks),*).map_err(::neural_arch::__private::Error::from)?
        };
        let name = format!("`{field}.{method}`");
        (Val::Unknown, tokens, Source(name))
    }

    fn call(&mut self, c: &syn::ExprCall, cx: &mut Ctxt) -> (Val, TokenStream, Source) {
        let Expr::Path(p) = &*c.func else {
            cx.error(c.func.span(), "call a layer by its name: `fc1(x)`");
            return (Val::Unknown, TokenStream::new(), Source("this".into()));
        };
        let Some(ident) = p.path.get_ident() else {
            cx.error(c.func.span(), "call a layer by its name: `fc1(x)`");
            return (Val::Unknown, TokenStream::new(), Source("this".into()));
        };
        let name = ident.to_string();
        let Some(&idx) = self.field_index.get(&name) else {
            let mut layers: Vec<&String> = self.field_index.keys().collect();
            layers.sort();
            let list = layers
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", ");
            cx.error(
                ident.span(),
                format!("unknown layer `{name}`; the layers are {list}"),
            );
            for a in &c.args {
                self.expr(a, cx);
            }
            return (
                Val::Unknown,
                TokenStream::new(),
                Source(format!("`{name}`")),
            );
        };
        let mut vals = Vec::new();
        let mut toks = Vec::new();
        let mut first_source = Source("the input".into());
        for (i, a) in c.args.iter().enumerate() {
            let (v, t, s) = self.expr(a, cx);
            if i == 0 {
                first_source = s;
            }
            vals.push(v);
            toks.push(t);
        }
        if vals.is_empty() {
            cx.error(
                c.span(),
                format!("layer `{name}` needs an input: `{name}(x)`"),
            );
            return (
                Val::Unknown,
                TokenStream::new(),
                Source(format!("`{name}`")),
            );
        }
        let field = self.scope.fields[&name];
        let input = if vals.len() == 1 {
            vals[0].clone()
        } else {
            Val::Tuple(vals)
        };
        let layer_ty = self.layer_types[idx].clone();
        let (out, filled) = if self.counting {
            (Val::Unknown, None)
        } else {
            if field.repeat.is_some() {
                crate::check::chain_step(field, &input, &first_source, self.scope, cx)
            } else {
                apply_layer(
                    field,
                    &layer_ty,
                    &input,
                    &first_source,
                    self.scope,
                    cx,
                    ident.span().into(),
                )
            }
        };
        if let Some(t) = filled {
            self.layer_types[idx] = t;
        }
        if !self.counting {
            if let Val::Known(s) = &out {
                self.outputs[idx] = Some(s.clone());
            }
        }
        let span = ident.span();
        let field_ident = &field.name;
        let arg = if toks.len() == 1 {
            toks.remove(0)
        } else {
            quote!((#(#toks,)*))
        };
        let tuple = c.args.len() > 1;
        let trait_name = format_ident!("__Layer_{}_{}", field_ident, self.calls);
        self.calls += 1;
        if !self.counting && !self.train {
            self.traits
                .push(call_trait(&trait_name, field, tuple, &input, &first_source));
        }
        let p = quote!(::neural_arch::__private);
        let tokens = if self.train && field.recompute {
            if tuple {
                quote_spanned! {span=> ::core::compile_error!("`#[recompute]` takes a layer of one input tensor") }
            } else if field.repeat.is_some() {
                // Block by block: each keeps only its own input.
                quote_spanned! {span=> {
                    let mut __x = #arg;
                    for __block in self.#field_ident.modules.iter_mut() {
                        __x = #p::recompute(__block, __x)?;
                    }
                    __x
                } }
            } else {
                quote_spanned! {span=> #p::recompute(&mut self.#field_ident, #arg)? }
            }
        } else if self.train {
            if tuple {
                quote_spanned! {span=> <_ as #trait_name<_, _>>::__call_mut(#arg, &mut self.#field_ident)? }
            } else {
                quote_spanned! {span=> <_ as #trait_name<_, _, _, _, _>>::__call_mut(#arg, &mut self.#field_ident)? }
            }
        } else {
            if tuple {
                quote_spanned! {span=> <_ as #trait_name<_, _>>::__call(#arg, &self.#field_ident)? }
            } else {
                quote_spanned! {span=> <_ as #trait_name<_, _, _, _, _>>::__call(#arg, &self.#field_ident)? }
            }
        };
        (out, tokens, Source(format!("`{name}`")))
    }
}

/// The check trait of one layer call: its message names the layer, what it is, and the shape
/// it is given (in the DSL's words where the macro knows it, else as the compiler prints it).
/// The output is a trait parameter, not an associated type: a projection in the signature would
/// make the compiler report dfdx's inner bound instead of this message.
fn call_trait(
    name: &syn::Ident,
    field: &Field,
    tuple: bool,
    input: &Val,
    from: &Source,
) -> TokenStream {
    let p = quote!(::neural_arch::__private);
    let lname = field.name.to_string();
    let inner = &field.layer;
    let shown = match &field.repeat {
        Some(n) => format!("[{}; {}]", tidy(&quote!(#inner)), tidy(&quote!(#n))),
        None => tidy(&quote!(#inner)),
    };
    let from_text = if from.0.is_empty() {
        String::new()
    } else {
        format!(" (from {})", from.0)
    };
    if tuple {
        let given = match input {
            Val::Tuple(vs) if vs.iter().all(|v| matches!(v, Val::Known(_))) => {
                let parts: Vec<String> = vs
                    .iter()
                    .filter_map(|v| match v {
                        Val::Known(s) => Some(s.to_string()),
                        _ => None,
                    })
                    .collect();
                format!("({})", parts.join(", "))
            }
            _ => "{X}".to_string(),
        };
        let msg = format!("layer `{lname}` (`{shown}`) cannot take the inputs `{given}`");
        let label = format!("`{lname}` does not accept these inputs");
        return quote! {
            #[diagnostic::on_unimplemented(message = #msg, label = #label)]
            #[allow(non_camel_case_types, dead_code)]
            trait #name<X, O> {
                fn __call(x: X, this: &Self) -> ::core::result::Result<O, #p::Error>;
                fn __call_mut(x: X, this: &mut Self) -> ::core::result::Result<O, #p::Error>;
            }
            impl<M, X> #name<X, <M as #p::Layer<X>>::Output> for M
            where
                M: #p::Layer<X>,
                <M as #p::Layer<X>>::Error: ::core::convert::Into<#p::Error>,
            {
                fn __call(x: X, this: &Self) -> ::core::result::Result<<M as #p::Layer<X>>::Output, #p::Error> {
                    #p::Layer::call(this, x).map_err(::core::convert::Into::into)
                }
                fn __call_mut(x: X, this: &mut Self) -> ::core::result::Result<<M as #p::Layer<X>>::Output, #p::Error> {
                    #p::Layer::call_mut(this, x).map_err(::core::convert::Into::into)
                }
            }
        };
    }
    let given = match input {
        Val::Known(s) => s.to_string(),
        _ => "{S}".to_string(),
    };
    let msg =
        format!("layer `{lname}` (`{shown}`) cannot take an input of shape `{given}`{from_text}");
    let label = if field.repeat.is_some() {
        format!("`{lname}` is given `{given}`; a repeated block must return the shape it takes")
    } else {
        format!("`{lname}` is given `{given}`")
    };
    quote! {
        #[diagnostic::on_unimplemented(message = #msg, label = #label)]
        #[allow(non_camel_case_types, dead_code)]
        trait #name<S: #p::Shape, E, D: #p::Storage<E>, T, O> {
            fn __call(x: #p::Tensor<S, E, D, T>, this: &Self) -> ::core::result::Result<O, #p::Error>;
            fn __call_mut(x: #p::Tensor<S, E, D, T>, this: &mut Self) -> ::core::result::Result<O, #p::Error>;
        }
        impl<M, S: #p::Shape, E, D: #p::Storage<E>, T>
            #name<S, E, D, T, <M as #p::Layer<#p::Tensor<S, E, D, T>>>::Output> for M
        where
            M: #p::Layer<#p::Tensor<S, E, D, T>>,
            <M as #p::Layer<#p::Tensor<S, E, D, T>>>::Error: ::core::convert::Into<#p::Error>,
        {
            fn __call(x: #p::Tensor<S, E, D, T>, this: &Self) -> ::core::result::Result<<M as #p::Layer<#p::Tensor<S, E, D, T>>>::Output, #p::Error> {
                #p::Layer::call(this, x).map_err(::core::convert::Into::into)
            }
            fn __call_mut(x: #p::Tensor<S, E, D, T>, this: &mut Self) -> ::core::result::Result<<M as #p::Layer<#p::Tensor<S, E, D, T>>>::Output, #p::Error> {
                #p::Layer::call_mut(this, x).map_err(::core::convert::Into::into)
            }
        }
    }
}

fn walk_new<'a, 'm>(
    model: &'m Model,
    scope: &'a Scope<'m>,
    layer_types: &'a mut Vec<Type>,
    outputs: &'a mut Vec<Option<Shp>>,
    counting: bool,
    train: bool,
) -> Walk<'a, 'm> {
    Walk {
        scope,
        vars: HashMap::new(),
        next_id: 0,
        uses: HashMap::new(),
        counting,
        train,
        layer_types,
        outputs,
        field_index: model
            .fields
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.to_string(), i))
            .collect(),
        calls: 0,
        tuple_sources: Vec::new(),
        traits: Vec::new(),
    }
}

/// Runs the body: returns the emitted statements and the final expression.
fn run(
    w: &mut Walk,
    fwd: &Forward,
    cx: &mut Ctxt,
) -> (Vec<TokenStream>, Val, TokenStream, Source, Span) {
    for (name, shape) in &fwd.params {
        w.bind(
            &name.to_string(),
            Val::Known(w.scope.shape_of(shape)),
            format!("the input `{name}`"),
        );
    }
    let mut stmts = Vec::new();
    let Some(body) = &fwd.body else {
        return (
            stmts,
            Val::Unknown,
            quote!(),
            Source(String::new()),
            Span::call_site(),
        );
    };
    let n = body.stmts.len();
    for (i, st) in body.stmts.iter().enumerate() {
        match st {
            Stmt::Local(local) => {
                let Some(init) = &local.init else {
                    cx.error(local.span(), "a `let` in a forward body needs a value");
                    continue;
                };
                let (val, tokens, src) = w.expr(&init.expr, cx);
                let single = matches!(local.pat, Pat::Ident(_));
                let pat = &local.pat;
                let names: Vec<(syn::Ident, Val)> = match pat {
                    Pat::Ident(pi) => vec![(pi.ident.clone(), val)],
                    Pat::Tuple(t) => {
                        let vals = match val {
                            Val::Tuple(v) if v.len() == t.elems.len() => v,
                            Val::Tuple(v) => {
                                cx.error(
                                    t.span(),
                                    format!(
                                        "this pattern takes {} values, but the expression gives {}",
                                        t.elems.len(),
                                        v.len()
                                    ),
                                );
                                vec![Val::Unknown; t.elems.len()]
                            }
                            _ => vec![Val::Unknown; t.elems.len()],
                        };
                        let mut out = Vec::new();
                        for (p, v) in t.elems.iter().zip(vals) {
                            match p {
                                Pat::Ident(pi) => out.push((pi.ident.clone(), v)),
                                Pat::Wild(_) => {}
                                other => {
                                    cx.error(other.span(), "bind names only: `let (a, b) = ...`")
                                }
                            }
                        }
                        out
                    }
                    other => {
                        cx.error(
                            other.span(),
                            "bind a name or a tuple of names: `let (a, b) = ...`",
                        );
                        Vec::new()
                    }
                };
                for (ident, v) in names {
                    if w.field_index.contains_key(&ident.to_string()) {
                        cx.error(
                            ident.span(),
                            format!("`{ident}` is the name of a layer; pick another variable name"),
                        );
                    }
                    let source = if single {
                        src.0.clone()
                    } else {
                        format!("`{ident}`")
                    };
                    w.bind(&ident.to_string(), v, source);
                }
                stmts.push(quote!(let #pat = #tokens;));
            }
            Stmt::Expr(e, None) if i + 1 == n => {
                let (val, tokens, src) = w.expr(e, cx);
                return (stmts, val, tokens, src, e.span());
            }
            Stmt::Expr(e, Some(semi)) if i + 1 == n => {
                w.expr(e, cx);
                cx.error(
                    semi.span,
                    "the forward body must end with the output expression: remove this `;`",
                );
                return (
                    stmts,
                    Val::Unknown,
                    TokenStream::new(),
                    Source(String::new()),
                    semi.span,
                );
            }
            other => {
                cx.error(
                    other.span(),
                    "a forward body is `let` statements and a final expression (no `;` after it)",
                );
            }
        }
    }
    cx.error(
        body.brace_token.span.close(),
        "the forward body must end with the output expression (no `;` after it)",
    );
    (
        stmts,
        Val::Unknown,
        TokenStream::new(),
        Source(String::new()),
        Span::call_site(),
    )
}

/// "1 output", "2 outputs".
fn count(n: usize) -> String {
    if n == 1 {
        "1 output".to_string()
    } else {
        format!("{n} outputs")
    }
}

/// Checks the body's shapes, reports problems, and fills in `Flatten` sizes and summary shapes.
pub fn check_body(
    model: &Model,
    fwd: &Forward,
    scope: &Scope,
    cx: &mut Ctxt,
    layer_types: &mut Vec<Type>,
    outputs: &mut Vec<Option<Shp>>,
    outputs_ok: bool,
) {
    let mut w = walk_new(model, scope, layer_types, outputs, false, false);
    let (_, val, _, src, span) = run(&mut w, fwd, cx);
    if !outputs_ok {
        return;
    }
    let want: Vec<Shp> = fwd.outputs.iter().map(|o| scope.shape_of(o)).collect();
    match (&val, fwd.tuple_output) {
        (Val::Tuple(vals), true) if vals.len() == want.len() => {
            let sources = std::mem::take(&mut w.tuple_sources);
            for (i, ((v, want), o)) in vals.iter().zip(&want).zip(&fwd.outputs).enumerate() {
                let from = sources.get(i).unwrap_or(&src);
                check_output(v, want, o.span, from, cx);
            }
        }
        (Val::Tuple(vals), _) => cx.error(
            span,
            format!(
                "`forward` declares {}, but the body returns {}",
                count(want.len()),
                vals.len()
            ),
        ),
        (_, true) if want.len() != 1 => cx.error(
            span,
            format!(
                "`forward` declares {}, but the body returns one",
                count(want.len())
            ),
        ),
        (v, _) => check_output(v, &want[0], fwd.outputs[0].span, &src, cx),
    }
}

/// Emits the body of `try_forward` (or `try_forward_mut` when `train`).
pub fn emit_body(
    model: &Model,
    fwd: &Forward,
    analysis: &Analysis,
    scope: &Scope,
    train: bool,
) -> (TokenStream, Vec<TokenStream>) {
    let mut types = analysis.layer_types.clone();
    let mut outs = analysis.outputs.clone();
    // Errors were reported by `check_body`; the passes here only count and emit.
    let mut scratch = Ctxt::default();
    let mut counter = walk_new(model, scope, &mut types, &mut outs, true, train);
    run(&mut counter, fwd, &mut scratch);
    let uses = counter.uses;
    let mut types = analysis.layer_types.clone();
    let mut outs = analysis.outputs.clone();
    let mut w = walk_new(model, scope, &mut types, &mut outs, false, train);
    w.uses = uses;
    let mut scratch = Ctxt::default();
    let (stmts, _, tail, _, _) = run(&mut w, fwd, &mut scratch);
    let _ = scratch.into_result();
    let tail = crate::expand::check_outputs(fwd, scope, tail);
    (quote! { #(#stmts)* Ok(#tail) }, w.traits)
}
