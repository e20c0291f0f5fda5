//! Meaning: names, and shapes as far as the macro can see them.
//!
//! The macro knows the shape rules of the built-in layers (`Linear`, `LayerNorm`, activations,
//! `Dropout`, `Flatten`, ...). It follows a symbolic shape through the layers and reports a
//! mismatch in the user's terms. What it cannot see (a nested model, a user's own layer) it
//! leaves to the type checker, through the generated per-layer traits of `expand.rs`, so that
//! nothing is checked twice and nothing is missed.

use crate::ast::{DimSpec, Field, Kind, Model, ShapeSpec};
use crate::rules::apply_layer;
use proc_macro2::Span;
use std::collections::{HashMap, HashSet};
use std::fmt;
use syn::{Expr, Ident, Type};

/// Collects every error, so that one compile reports all mistakes (serde_derive's `Ctxt`).
#[derive(Default)]
pub struct Ctxt {
    errors: Vec<syn::Error>,
    /// Rules on const parameters, asserted when the model is built.
    pub checks: Vec<ConstCheck>,
}

/// Where an error points: from the first to the last token of, say, `fc2: Linear<256, 10>`.
/// (`Span::join` is nightly-only; `syn::Error::new_spanned` keeps both ends instead.)
#[derive(Clone, Copy)]
pub struct Loc(pub Span, pub Span);

impl From<Span> for Loc {
    fn from(s: Span) -> Self {
        Loc(s, s)
    }
}

impl Ctxt {
    pub fn error_count(&self) -> usize {
        self.errors.len()
    }

    pub fn error(&mut self, at: impl Into<Loc>, msg: impl fmt::Display) {
        let Loc(start, end) = at.into();
        let ends: proc_macro2::TokenStream = [
            proc_macro2::TokenTree::Punct(proc_macro2::Punct::new(
                '#',
                proc_macro2::Spacing::Alone,
            )),
            proc_macro2::TokenTree::Punct(proc_macro2::Punct::new(
                '#',
                proc_macro2::Spacing::Alone,
            )),
        ]
        .into_iter()
        .zip([start, end])
        .map(|(mut t, s)| {
            t.set_span(s);
            t
        })
        .collect();
        self.errors.push(syn::Error::new_spanned(ends, msg));
    }
    pub fn into_result(self) -> Result<(), syn::Error> {
        let mut it = self.errors.into_iter();
        match it.next() {
            None => Ok(()),
            Some(mut first) => {
                for e in it {
                    first.combine(e);
                }
                Err(first)
            }
        }
    }
}

/// A dimension as the macro sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sym {
    /// A fixed size known now.
    Lit(u128),
    /// A const parameter of the model: fixed, known when the model is instantiated.
    Param(String),
    /// A size known only at run time (batch, sequence length).
    Runtime(String),
    /// Something the macro cannot evaluate (an outside constant); the compiler checks it.
    Opaque(String),
}

impl fmt::Display for Sym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sym::Lit(n) => write!(f, "{n}"),
            Sym::Param(s) | Sym::Runtime(s) | Sym::Opaque(s) => f.write_str(s),
        }
    }
}

/// A shape as the macro sees it: all dimensions, or only the trailing ones (`[*, 128]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shp {
    pub full: bool,
    pub dims: Vec<Sym>,
    /// Float features, token ids or a mask.
    pub dtype: Kind,
}

/// The value of a variable or a layer output: a shape, not known, or several outputs.
#[derive(Clone, Debug)]
pub enum Val {
    Known(Shp),
    Unknown,
    Tuple(Vec<Val>),
}

impl fmt::Display for Shp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.dtype.prefix())?;
        let mut parts: Vec<String> = Vec::new();
        if !self.full {
            parts.push("*".into());
        }
        parts.extend(self.dims.iter().map(|d| d.to_string()));
        write!(f, "[{}]", parts.join(", "))
    }
}

/// Evaluates arithmetic on integer literals: `28 * 28`, `(32 - 4) / 2 + 1`.
pub fn eval_const(e: &Expr) -> Option<u128> {
    match e {
        Expr::Lit(l) => match &l.lit {
            syn::Lit::Int(i) => i.base10_parse().ok(),
            _ => None,
        },
        Expr::Paren(p) => eval_const(&p.expr),
        Expr::Group(g) => eval_const(&g.expr),
        Expr::Block(b) if b.block.stmts.len() == 1 => match &b.block.stmts[0] {
            syn::Stmt::Expr(e, None) => eval_const(e),
            _ => None,
        },
        Expr::Binary(b) => {
            let (l, r) = (eval_const(&b.left)?, eval_const(&b.right)?);
            match b.op {
                syn::BinOp::Add(_) => l.checked_add(r),
                syn::BinOp::Sub(_) => l.checked_sub(r),
                syn::BinOp::Mul(_) => l.checked_mul(r),
                syn::BinOp::Div(_) => l.checked_div(r),
                syn::BinOp::Rem(_) => l.checked_rem(r),
                _ => None,
            }
        }
        _ => None,
    }
}

/// What the macro learned about a model, for `expand.rs`.
pub struct Analysis {
    /// Per field: the layer type to build (a bare `Flatten` gets its size filled in).
    pub layer_types: Vec<Type>,
    /// Per field: the output shape for the summary (`None` if the macro could not tell).
    pub outputs: Vec<Option<Shp>>,
    /// Names of the runtime dimensions of the forward signature, in order of appearance.
    pub runtime_dims: Vec<Ident>,
    /// Rules on const parameters, asserted when the model is built.
    pub const_checks: Vec<ConstCheck>,
}

/// Names in scope while checking one model.
pub struct Scope<'a> {
    pub consts: HashSet<String>,
    pub runtime: HashSet<String>,
    pub fields: HashMap<String, &'a Field>,
}

impl<'a> Scope<'a> {
    /// The names of `model`, with `runtime` the runtime sizes of its forward signature.
    pub fn new(model: &'a Model, runtime: &[Ident]) -> Self {
        Scope {
            consts: model.consts.iter().map(|c| c.to_string()).collect(),
            runtime: runtime.iter().map(|i| i.to_string()).collect(),
            fields: model
                .fields
                .iter()
                .map(|f| (f.name.to_string(), f))
                .collect(),
        }
    }

    pub fn sym_of_dim(&self, d: &DimSpec) -> Sym {
        match d {
            DimSpec::Lit(n, _) => Sym::Lit(*n),
            DimSpec::Ident(i) => {
                let s = i.to_string();
                if self.consts.contains(&s) {
                    Sym::Param(s)
                } else {
                    Sym::Runtime(s)
                }
            }
        }
    }
    pub fn shape_of(&self, s: &ShapeSpec) -> Shp {
        Shp {
            full: true,
            dims: s.dims.iter().map(|d| self.sym_of_dim(d)).collect(),
            dtype: s.dtype,
        }
    }
}

/// A divisibility rule the compiler must check once const parameters are known: emitted as a
/// const assertion spanned on the layer, so the message still names it.
pub struct ConstCheck {
    pub span: Span,
    pub lhs: Sym,
    pub rhs: Sym,
    pub message: String,
}

/// Whether two dimensions are the same size for the type checker, or `None` if it is for the
/// compiler to say (an opaque constant).
pub fn same(a: &Sym, b: &Sym) -> Option<bool> {
    match (a, b) {
        (Sym::Opaque(_), _) | (_, Sym::Opaque(_)) => None,
        _ => Some(a == b),
    }
}

/// The producer of a value, for messages: "`fc1` produces" or "the input `x` is".
pub struct Source(pub String);

impl Source {
    pub fn produces(&self) -> String {
        if self.0.starts_with('`') {
            format!("{} produces", self.0)
        } else {
            format!("{} is", self.0)
        }
    }
}

/// Checks the whole model; fills in what `expand.rs` needs.
pub fn check(model: &Model, cx: &mut Ctxt) -> Analysis {
    let consts: HashSet<String> = model.consts.iter().map(|c| c.to_string()).collect();
    let mut runtime_dims: Vec<Ident> = Vec::new();
    // A declared output that is itself wrong is not compared with what the layers produce.
    let mut outputs_ok = true;
    if let Some(fwd) = &model.forward {
        let mut seen = HashSet::new();
        for shape in fwd.params.iter().map(|p| &p.1).chain(&fwd.outputs) {
            for d in &shape.dims {
                if let DimSpec::Ident(i) = d {
                    let s = i.to_string();
                    if !consts.contains(&s) && seen.insert(s) {
                        runtime_dims.push(i.clone());
                    }
                }
            }
        }
        for (name, _) in &fwd.params {
            if model.fields.iter().any(|f| f.name == *name) {
                cx.error(
                    name.span(),
                    format!("input `{name}` has the name of a layer; rename one"),
                );
            }
        }
        for o in fwd.outputs.iter() {
            for d in &o.dims {
                if let DimSpec::Ident(i) = d {
                    let used_in_inputs = fwd.params.iter().any(|p| {
                        p.1.dims
                            .iter()
                            .any(|pd| matches!(pd, DimSpec::Ident(pi) if pi == i))
                    });
                    if !consts.contains(&i.to_string()) && !used_in_inputs {
                        outputs_ok = false;
                        cx.error(
                            i.span(),
                            format!(
                                "output size `{i}` is neither a const parameter of the model nor a \
                                 size of an input; runtime sizes come from the inputs"
                            ),
                        );
                    }
                }
            }
        }
    }
    let mut seen = HashSet::new();
    let mut keys = HashSet::new();
    for f in &model.fields {
        if !seen.insert(f.name.to_string()) {
            cx.error(f.name.span(), format!("duplicate layer name `{}`", f.name));
        } else if !keys.insert(f.key.clone()) {
            cx.error(
                f.name.span(),
                format!(
                    "layer `{}` has the checkpoint key `{}`, which another layer already has",
                    f.name, f.key
                ),
            );
        }
        if let Some(n) = &f.repeat {
            if eval_const(n) == Some(0) {
                cx.error(
                    f.span,
                    format!("layer `{}` repeats its block 0 times", f.name),
                );
            }
        }
        if let Some(c) = model.consts.iter().find(|c| **c == f.name) {
            cx.error(
                c.span(),
                format!("`{c}` names both a const parameter and a layer"),
            );
        }
    }
    if model.fields.is_empty() {
        cx.error(
            model.name.span(),
            format!("model `{}` has no layers", model.name),
        );
    }
    let scope = Scope::new(model, &runtime_dims);
    let mut layer_types: Vec<Type> = model.fields.iter().map(|f| f.layer.clone()).collect();
    let mut outputs = vec![None; model.fields.len()];
    match &model.forward {
        Some(fwd) if fwd.body.is_some() => {
            crate::graph::check_body(
                model,
                fwd,
                &scope,
                cx,
                &mut layer_types,
                &mut outputs,
                outputs_ok,
            );
        }
        _ => {
            // A chain: each layer takes the previous one's output.
            let mut val = match &model.forward {
                Some(fwd) => {
                    if fwd.params.len() != 1 || fwd.outputs.len() != 1 || fwd.tuple_output {
                        cx.error(
                            fwd.kw.span(),
                            "a forward without a body runs the layers as a chain: it takes one \
                             input and returns one output; write a body for anything else",
                        );
                    }
                    Val::Known(scope.shape_of(&fwd.params[0].1))
                }
                None => Val::Unknown,
            };
            let mut source = match &model.forward {
                Some(fwd) => Source(format!("the input `{}`", fwd.params[0].0)),
                None => Source(String::new()),
            };
            for (i, f) in model.fields.iter().enumerate() {
                let (out, ty) = chain_step(f, &val, &source, &scope, cx);
                if let Some(ty) = ty {
                    layer_types[i] = ty;
                }
                outputs[i] = match &out {
                    Val::Known(s) => Some(s.clone()),
                    _ => None,
                };
                val = out;
                source = Source(format!("`{}`", f.name));
            }
            if let (Some(fwd), true) = (&model.forward, outputs_ok) {
                check_output(
                    &val,
                    &scope.shape_of(&fwd.outputs[0]),
                    fwd.outputs[0].span,
                    &source,
                    cx,
                );
            }
        }
    }
    Analysis {
        layer_types,
        outputs,
        runtime_dims,
        const_checks: std::mem::take(&mut cx.checks),
    }
}

/// One layer of a chain, including `[Block; N]` repetition.
pub fn chain_step(
    f: &Field,
    input: &Val,
    from: &Source,
    scope: &Scope,
    cx: &mut Ctxt,
) -> (Val, Option<Type>) {
    let before = cx.error_count();
    let (out, ty) = apply_layer(f, &f.layer, input, from, scope, cx, f.span);
    // A block that did not take its input is reported once, not again as a shape change.
    if f.repeat.is_none() || cx.error_count() > before {
        return (out, ty);
    }
    if ty.is_some() {
        cx.error(
            f.span,
            "`Flatten` changes the shape, so it cannot be repeated",
        );
        return (out, ty);
    }
    // The second copy takes the first one's output: if that does not fit, the block does not
    // keep its shape (this also covers inputs the macro cannot see).
    let mut scratch = Ctxt::default();
    let (again, _) = apply_layer(f, &f.layer, &out, from, scope, &mut scratch, f.span);
    let changes = scratch.into_result().is_err()
        || matches!((&out, &again), (Val::Known(a), Val::Known(b)) if a != b);
    if changes {
        let msg = match (input, &out) {
            (Val::Known(a), Val::Known(b)) => format!("but it turns `{a}` into `{b}`"),
            (_, Val::Known(b)) => format!("but it produces `{b}`, which the next copy cannot take"),
            _ => "but its output does not fit its own input".to_string(),
        };
        cx.error(
            f.span,
            format!(
                "layer `{}` repeats its block, so the block must keep its shape, {msg}",
                f.name
            ),
        );
    }
    (out, ty)
}

/// The declared output against what the layers produce.
pub fn check_output(got: &Val, want: &Shp, span: Span, from: &Source, cx: &mut Ctxt) {
    let Val::Known(g) = got else { return };
    let n = g.dims.len().min(want.dims.len());
    let tail_g = &g.dims[g.dims.len() - n..];
    let tail_w = &want.dims[want.dims.len() - n..];
    let rank_bad = if g.full {
        g.dims.len() != want.dims.len()
    } else {
        g.dims.len() > want.dims.len()
    };
    let dim_bad = tail_g
        .iter()
        .zip(tail_w)
        .any(|(a, b)| same(a, b) == Some(false));
    if rank_bad || dim_bad {
        cx.error(
            span,
            format!(
                "`forward` declares the output `{want}`, but {} `{g}`",
                from.produces()
            ),
        );
    }
}
