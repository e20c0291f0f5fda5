//! The shape rules of the built-in layers, as the macro applies them to symbolic shapes.
//!
//! Each rule checks what the layer needs of its input and computes its output: `Linear<I, O>`
//! takes `[*, I]` to `[*, O]`, `Conv2d` computes its output size, and so on. Where the output
//! size is a number the macro can compute (a convolution's height), it also writes that number
//! into the layer's type (`Conv2d<.., Const<14>, Const<14>>`, `Flatten<784>`), so that the
//! compiler carries it on. What the macro does not know (a user's layer, a nested model) is the
//! compiler's to check.

use crate::ast::{Field, Kind};
use crate::check::{same, ConstCheck, Ctxt, Loc, Scope, Shp, Source, Sym, Val};
use proc_macro2::{Span, TokenStream};
use quote::{quote, ToTokens};
use syn::{GenericArgument, PathArguments, Type};

/// A built-in layer, as far as its shape rule goes.
enum Rule {
    /// `[*, from] -> [*, to]`: Linear.
    LastDim { from: Sym, to: Sym },
    /// `[*, n] -> [*, n]`: LayerNorm, RMSNorm, attention, SwiGLU.
    KeepLast(Sym),
    /// Any shape to itself: activations, dropout.
    Identity,
    /// `[B, ...] -> [B, product]`, with the product given (`Flatten<N>`) or not (`Flatten`).
    Flatten(Option<Sym>),
    /// `[B, CI, H, W] -> [B, CO, H', W']`.
    Conv(Conv),
    /// `[B, C, H, W] -> [B, C, H', W']`.
    Pool {
        k: Sym,
        s: Sym,
        p: Sym,
        out: Option<(Sym, Sym)>,
    },
    /// `[B, C, H, W] -> [B, C]`.
    GlobalPool,
    /// `[B, C, H, W] -> [B, (H/P)·(W/P), D]`.
    Patch { c: Sym, d: Sym, p: Sym },
    /// `usize[*] -> [*, D]`.
    Embedding { d: Sym },
    /// `[*, T, D] -> [*, T, D]` with `T ≤ MAX`.
    Positions { max: Sym, d: Sym },
    /// `[B, C, H, W]` to itself: BatchNorm2d.
    Channels(Sym),
    /// `([*, S, M], [*, T, M]) -> [*, S, M]`: cross-attention, with an optional
    /// `bool[*, T]` key mask as a third input.
    Cross(Sym),
    /// `[*, S, M] -> [*, S, M]`, or `([*, S, M], bool[*, S])` with a padding mask.
    Attend(Sym),
    /// `[*, A·C] -> [*, A, C]`.
    Split { a: Sym, c: Sym },
}

struct Conv {
    ci: Sym,
    co: Sym,
    k: Sym,
    s: Sym,
    p: Sym,
    dil: Sym,
    g: Sym,
    /// The output height and width written as the type's last two arguments (`Const<HO>`).
    out: Option<(Sym, Sym)>,
}

/// The output sizes a window layer's type declares at `at` and `at + 1` (`.., Const<HO>,
/// Const<WO>>`), when both are `Const<n>` or `Const<PARAM>`: a generic block cannot have the
/// macro compute `(HI + 2·P − K) / S + 1` from a parameter, so it writes the result.
fn declared_out(h: &Head, at: usize, scope: &Scope) -> Option<(Sym, Sym)> {
    let dim = |i: usize| -> Option<Sym> {
        let GenericArgument::Type(Type::Path(tp)) = &h.args.get(i)?.2 else {
            return None;
        };
        let seg = tp.path.segments.last()?;
        let PathArguments::AngleBracketed(a) = &seg.arguments else {
            return None;
        };
        (seg.ident == "Const" && a.args.len() == 1).then(|| sym_of_arg(&a.args[0], scope))
    };
    Some((dim(at)?, dim(at + 1)?))
}

/// A layer's type split for rewriting: its path and its generic arguments as written.
struct Head {
    name: String,
    args: Vec<(Sym, Span, GenericArgument)>,
}

fn sym_of_arg(arg: &GenericArgument, scope: &Scope) -> Sym {
    match arg {
        GenericArgument::Const(e) => match crate::check::eval_const(e) {
            Some(n) => Sym::Lit(n),
            None => Sym::Opaque(e.to_token_stream().to_string()),
        },
        GenericArgument::Type(Type::Path(tp)) if tp.path.get_ident().is_some() => {
            let s = tp.path.segments[0].ident.to_string();
            if scope.consts.contains(&s) {
                Sym::Param(s)
            } else if scope.runtime.contains(&s) {
                Sym::Runtime(s)
            } else {
                Sym::Opaque(s)
            }
        }
        other => Sym::Opaque(other.to_token_stream().to_string()),
    }
}

fn head(ty: &Type, scope: &Scope) -> Option<Head> {
    let Type::Path(p) = ty else { return None };
    let seg = p.path.segments.last()?;
    let mut args = Vec::new();
    if let PathArguments::AngleBracketed(a) = &seg.arguments {
        for arg in &a.args {
            args.push((
                sym_of_arg(arg, scope),
                syn::spanned::Spanned::span(arg),
                arg.clone(),
            ));
        }
    }
    Some(Head {
        name: seg.ident.to_string(),
        args,
    })
}

/// `ty` with its generic arguments replaced.
fn with_args(ty: &Type, args: Vec<TokenStream>) -> Option<Type> {
    let Type::Path(mut p) = ty.clone() else {
        return None;
    };
    let seg = p.path.segments.last_mut()?;
    let new: syn::AngleBracketedGenericArguments = syn::parse2(quote!(<#(#args),*>)).ok()?;
    seg.arguments = PathArguments::AngleBracketed(new);
    Some(Type::Path(p))
}

fn size_type(s: &Sym) -> TokenStream {
    match s {
        Sym::Lit(n) => {
            let lit = proc_macro2::Literal::u128_unsuffixed(*n);
            quote!(::neural_arch::__private::Const<#lit>)
        }
        _ => quote!(usize),
    }
}

/// `den` divides `num`: an error now for numbers, a const assertion for const parameters.
fn divides(cx: &mut Ctxt, span: Span, message: String, num: &Sym, den: &Sym) -> bool {
    match (num, den) {
        (_, Sym::Lit(0)) => {
            cx.error(span, format!("{message}, but it is 0"));
            false
        }
        // Everything divides by 1 (and `C % 1` in the generated check trips clippy).
        (_, Sym::Lit(1)) => true,
        (Sym::Lit(a), Sym::Lit(b)) if a % b != 0 => {
            cx.error(
                span,
                format!("{message}, but {a} = {} × {b} + {}", a / b, a % b),
            );
            false
        }
        (Sym::Lit(_), Sym::Lit(_)) => true,
        _ => {
            cx.checks.push(ConstCheck {
                span,
                lhs: num.clone(),
                rhs: den.clone(),
                message,
            });
            true
        }
    }
}

fn at_least_one(cx: &mut Ctxt, span: Span, field: &str, what: &str, v: &Sym) -> bool {
    if *v == Sym::Lit(0) {
        cx.error(
            span,
            format!("layer `{field}`: the {what} must be at least 1"),
        );
        return false;
    }
    true
}

fn rule_of(ty: &Type, scope: &Scope, cx: &mut Ctxt, field: &str) -> Option<(Rule, Head)> {
    let h = head(ty, scope)?;
    for (a, span, _) in &h.args {
        if let Sym::Runtime(r) = a {
            cx.error(
                *span,
                format!(
                    "layer `{field}`: `{r}` is a runtime size of `forward`, but layer sizes must be \
                     fixed: use a number or a const parameter of the model"
                ),
            );
            return None;
        }
    }
    let arg = |i: usize| h.args.get(i).map(|a| a.0.clone());
    let or = |i: usize, d: u128| arg(i).unwrap_or(Sym::Lit(d));
    let span_of = |i: usize| h.args.get(i).map(|a| a.1).unwrap_or_else(Span::call_site);
    let n = h.args.len();
    let heads = |cx: &mut Ctxt, width: &Sym, heads_at: usize, what: &str| {
        let hs = arg(heads_at).unwrap_or(Sym::Lit(1));
        if hs == Sym::Lit(0) {
            cx.error(
                span_of(heads_at),
                format!("layer `{field}` needs at least one head"),
            );
            return false;
        }
        let message =
            format!("layer `{field}`: the number of heads `{hs}` must divide the {what} `{width}`");
        divides(cx, span_of(heads_at), message, width, &hs)
    };
    let rule = match (h.name.as_str(), n) {
        ("Linear" | "LinearNoBias", 2) => Rule::LastDim {
            from: arg(0)?,
            to: arg(1)?,
        },
        ("LayerNorm", 1 | 2) | ("RMSNorm", 1) => Rule::KeepLast(arg(0)?),
        ("SwiGLU", 2) => Rule::KeepLast(arg(0)?),
        (
            "ReLU" | "Gelu" | "GeluTanh" | "QuickGelu" | "SiLU" | "Sigmoid" | "Tanh" | "Softmax"
            | "LogSoftmax",
            0,
        )
        | ("Dropout", 1) => Rule::Identity,
        ("Flatten", 0) => Rule::Flatten(None),
        ("Flatten", 1) => Rule::Flatten(arg(0)),
        ("SelfAttention", 2 | 4) => {
            let m = arg(0)?;
            if n == 4 {
                let ok = heads(cx, &arg(2)?, 1, "key width");
                if !(ok && heads(cx, &arg(3)?, 1, "value width")) {
                    return None;
                }
            } else if !heads(cx, &m, 1, "width") {
                return None;
            }
            Rule::Attend(m)
        }
        ("CausalSelfAttention", 2) => {
            let m = arg(0)?;
            if !heads(cx, &m, 1, "width") {
                return None;
            }
            Rule::KeepLast(m)
        }
        ("CrossAttention", 2) => {
            let m = arg(0)?;
            if !heads(cx, &m, 1, "width") {
                return None;
            }
            Rule::Cross(m)
        }
        ("GqaAttention", 4 | 5) => {
            let (hq, kvh, hd) = (arg(1)?, arg(2)?, arg(3)?);
            let message = format!(
                "layer `{field}`: the key/value heads `{kvh}` must divide the query heads `{hq}`"
            );
            let ok = divides(cx, span_of(2), message, &hq, &kvh);
            let message = format!("layer `{field}`: RoPE needs an even head width, not `{hd}`");
            if !(ok && divides(cx, span_of(3), message, &hd, &Sym::Lit(2))) {
                return None;
            }
            Rule::KeepLast(arg(0)?)
        }
        ("Conv2d", 3..=10) => {
            let c = Conv {
                ci: arg(0)?,
                co: arg(1)?,
                k: arg(2)?,
                s: or(3, 1),
                p: or(4, 0),
                dil: or(5, 1),
                g: or(6, 1),
                out: declared_out(&h, 8, scope),
            };
            let ok = at_least_one(cx, span_of(2), field, "kernel size", &c.k)
                & at_least_one(cx, span_of(3), field, "stride", &c.s)
                & at_least_one(cx, span_of(5), field, "dilation", &c.dil);
            let msg = |what: &str, v: &Sym| {
                format!(
                    "layer `{field}`: the groups `{}` must divide the {what} `{v}`",
                    c.g
                )
            };
            let ok = ok
                & divides(cx, span_of(6), msg("input channels", &c.ci), &c.ci, &c.g)
                & divides(cx, span_of(6), msg("output channels", &c.co), &c.co, &c.g);
            if !ok {
                return None;
            }
            Rule::Conv(c)
        }
        ("MaxPool2d" | "AvgPool2d", 1..=5) => {
            let k = arg(0)?;
            let (s, p) = (arg(1).unwrap_or_else(|| k.clone()), or(2, 0));
            if !(at_least_one(cx, span_of(0), field, "kernel size", &k)
                & at_least_one(cx, span_of(1), field, "stride", &s))
            {
                return None;
            }
            if let (Sym::Lit(k), Sym::Lit(p)) = (&k, &p) {
                if 2 * p > *k {
                    cx.error(
                        span_of(2),
                        format!(
                            "layer `{field}`: padding {p} is more than half the kernel {k} \
                             (PyTorch refuses this too: the window would hold only padding)"
                        ),
                    );
                    return None;
                }
            }
            Rule::Pool {
                k,
                s,
                p,
                out: declared_out(&h, 3, scope),
            }
        }
        ("GlobalAvgPool", 0) => Rule::GlobalPool,
        ("PatchEmbed", 3) => Rule::Patch {
            c: arg(0)?,
            d: arg(1)?,
            p: arg(2)?,
        },
        ("Embedding", 2) => Rule::Embedding { d: arg(1)? },
        ("PositionalEmbedding", 2) => Rule::Positions {
            max: arg(0)?,
            d: arg(1)?,
        },
        ("BatchNorm2d", 1) => Rule::Channels(arg(0)?),
        ("Unflatten2", 2) => Rule::Split {
            a: arg(0)?,
            c: arg(1)?,
        },
        _ => return None,
    };
    Some((rule, h))
}

/// `(h + 2p - dil·(k-1) - 1) / s + 1`, or why it cannot be computed.
fn window_out(
    axis: &str,
    h: &Sym,
    k: &Sym,
    s: &Sym,
    p: &Sym,
    dil: &Sym,
) -> Result<Option<u128>, String> {
    let (Sym::Lit(h), Sym::Lit(k), Sym::Lit(s), Sym::Lit(p), Sym::Lit(dil)) = (h, k, s, p, dil)
    else {
        return Ok(None);
    };
    let span = dil * (k - 1) + 1;
    let padded = h + 2 * p;
    if padded < span {
        let what = if *dil > 1 {
            format!("the kernel {k} with dilation {dil} spans {span}, more than")
        } else {
            format!("the kernel {k} is larger than")
        };
        return Err(format!("{what} the {axis} {h} padded by {p} on each side"));
    }
    Ok(Some((padded - span) / s + 1))
}

/// Applies a layer to a value: returns the output (and the layer's type with computed sizes
/// written in), and reports a mismatch on `span`.
pub fn apply_layer(
    field: &Field,
    layer_ty: &Type,
    input: &Val,
    from: &Source,
    scope: &Scope,
    cx: &mut Ctxt,
    span: Loc,
) -> (Val, Option<Type>) {
    let name = field.name.to_string();
    let Some((rule, head)) = rule_of(layer_ty, scope, cx, &name) else {
        return (Val::Unknown, None);
    };
    let ctx = Apply {
        name: &name,
        from,
        span,
        layer_ty,
    };
    match (&rule, input) {
        (Rule::Cross(m), _) => return ctx.cross(cx, m, input),
        (Rule::Attend(m), Val::Tuple(parts)) => return ctx.masked(cx, m, parts),
        _ => {}
    }
    let input_shape = match input {
        Val::Known(s) => Some(s.clone()),
        Val::Tuple(v) => {
            cx.error(
                span,
                format!("layer `{name}` takes one input, but is given {}", v.len()),
            );
            return (Val::Unknown, None);
        }
        Val::Unknown => None,
    };
    let wants = if matches!(rule, Rule::Embedding { .. }) {
        Kind::Ids
    } else {
        Kind::Float
    };
    if let Some(s) = &input_shape {
        if s.dtype != wants {
            let msg = match (wants, s.dtype) {
                (Kind::Ids, _) => format!(
                    "layer `{name}` looks up token ids, but {} {} `{s}`; declare the input as \
                     ids: `ids: usize[B, T]`",
                    from.produces(),
                    what(s.dtype)
                ),
                _ => format!(
                    "layer `{name}` takes float features, but {} {} `{s}`{}",
                    from.produces(),
                    what(s.dtype),
                    if s.dtype == Kind::Ids {
                        "; look them up with an `Embedding` first"
                    } else {
                        "; a mask goes to an attention layer beside its input: `attn(x, mask)`"
                    }
                ),
            };
            cx.error(span, msg);
            return (Val::Unknown, None);
        }
    }
    match rule {
        Rule::LastDim { from: i, to: o } => {
            let out = match input_shape {
                Some(mut s) => {
                    ctx.check_last(cx, &i, &s);
                    match s.dims.last_mut() {
                        Some(last) => *last = o,
                        None => s.dims.push(o),
                    }
                    s
                }
                None => Shp {
                    full: false,
                    dims: vec![o],
                    dtype: Kind::Float,
                },
            };
            (Val::Known(out), None)
        }
        Rule::KeepLast(m) | Rule::Attend(m) => match input_shape {
            Some(s) => {
                ctx.check_last(cx, &m, &s);
                (Val::Known(s), None)
            }
            None => (
                Val::Known(Shp {
                    full: false,
                    dims: vec![m],
                    dtype: Kind::Float,
                }),
                None,
            ),
        },
        Rule::Identity => (input.clone(), None),
        Rule::Flatten(given) => ctx.flatten(cx, given, input_shape),
        Rule::Conv(c) => ctx.conv(cx, &c, &head, input_shape),
        Rule::Pool { k, s, p, out } => ctx.pool(cx, &k, &s, &p, out, &head, input_shape),
        Rule::GlobalPool => match ctx.image(cx, input_shape, None) {
            Some(s) => (
                Val::Known(Shp {
                    full: true,
                    dims: s.dims[..2].to_vec(),
                    dtype: Kind::Float,
                }),
                None,
            ),
            None => (Val::Unknown, None),
        },
        Rule::Patch { c, d, p } => ctx.patch(cx, &c, &d, &p, &head, input_shape),
        Rule::Embedding { d } => match input_shape {
            Some(mut s) => {
                s.dims.push(d);
                s.dtype = Kind::Float;
                (Val::Known(s), None)
            }
            None => (
                Val::Known(Shp {
                    full: false,
                    dims: vec![d],
                    dtype: Kind::Float,
                }),
                None,
            ),
        },
        Rule::Positions { max, d } => match input_shape {
            Some(s) => {
                if ctx.check_last(cx, &d, &s) && s.dims.len() >= 2 {
                    let t = &s.dims[s.dims.len() - 2];
                    if let (Sym::Lit(t), Sym::Lit(m)) = (t, &max) {
                        if t > m {
                            cx.error(
                                span,
                                format!(
                                    "layer `{name}` holds {m} positions, but {} `{s}`: a sequence of {t}",
                                    from.produces()
                                ),
                            );
                        }
                    }
                }
                (Val::Known(s), None)
            }
            None => (
                Val::Known(Shp {
                    full: false,
                    dims: vec![d],
                    dtype: Kind::Float,
                }),
                None,
            ),
        },
        Rule::Channels(c) => match ctx.image(cx, input_shape, Some(&c)) {
            Some(s) => (Val::Known(s), None),
            None => (Val::Unknown, None),
        },
        Rule::Cross(_) => (Val::Unknown, None),
        Rule::Split { a, c } => {
            let product = match (&a, &c) {
                (Sym::Lit(x), Sym::Lit(y)) => Sym::Lit(x * y),
                _ => Sym::Opaque(format!("{a}·{c}")),
            };
            match input_shape {
                Some(mut s) => {
                    ctx.check_last(cx, &product, &s);
                    s.dims.pop();
                    s.dims.extend([a, c]);
                    (Val::Known(s), None)
                }
                None => (
                    Val::Known(Shp {
                        full: false,
                        dims: vec![a, c],
                        dtype: Kind::Float,
                    }),
                    None,
                ),
            }
        }
    }
}

/// How a message names what a tensor holds.
fn what(k: Kind) -> &'static str {
    match k {
        Kind::Float => "float features",
        Kind::Ids => "token ids",
        Kind::Mask => "a mask",
    }
}

/// What every rule needs to report in the user's words.
struct Apply<'a> {
    name: &'a str,
    from: &'a Source,
    span: Loc,
    layer_ty: &'a Type,
}

impl Apply<'_> {
    fn mismatch(&self, cx: &mut Ctxt, expected: String, got: &Shp) {
        cx.error(
            self.span,
            format!(
                "layer `{}` expects input `{expected}`, but {} `{got}`",
                self.name,
                self.from.produces()
            ),
        );
    }

    fn check_last(&self, cx: &mut Ctxt, want: &Sym, s: &Shp) -> bool {
        let expected = Shp {
            full: false,
            dims: vec![want.clone()],
            dtype: Kind::Float,
        }
        .to_string();
        match s.dims.last() {
            None => {
                self.mismatch(cx, expected, s);
                false
            }
            Some(Sym::Runtime(r)) if !matches!(want, Sym::Runtime(_)) => {
                cx.error(
                    self.span,
                    format!(
                        "layer `{}` expects input `{expected}`, but {} `{s}`: `{r}` is a runtime \
                         size, and this layer needs it fixed; put the size (or a const parameter) \
                         in the shape",
                        self.name,
                        self.from.produces()
                    ),
                );
                false
            }
            Some(d) if same(d, want) == Some(false) => {
                self.mismatch(cx, expected, s);
                false
            }
            Some(_) => true,
        }
    }

    /// An image `[B, C, H, W]` (with `C` checked when given), or an error.
    fn image(&self, cx: &mut Ctxt, input: Option<Shp>, channels: Option<&Sym>) -> Option<Shp> {
        let expected = match channels {
            Some(c) => format!("[B, {c}, H, W]"),
            None => "[B, C, H, W]".to_string(),
        };
        match input {
            Some(s) if s.full && s.dims.len() == 4 => {
                if let Some(c) = channels {
                    if same(&s.dims[1], c) == Some(false) {
                        self.mismatch(cx, expected, &s);
                        return None;
                    }
                }
                Some(s)
            }
            Some(s) if s.full || s.dims.len() > 4 => {
                self.mismatch(cx, expected, &s);
                None
            }
            _ => None,
        }
    }

    fn flatten(
        &self,
        cx: &mut Ctxt,
        given: Option<Sym>,
        input: Option<Shp>,
    ) -> (Val, Option<Type>) {
        let name = self.name;
        let s = match input {
            Some(s) if s.full && s.dims.len() >= 3 => s,
            Some(s) if s.full => {
                cx.error(
                    self.span,
                    format!(
                        "layer `{name}` flattens `[B, d1, d2, ...]` (at least two dimensions after \
                         the batch), but {} `{s}`",
                        self.from.produces()
                    ),
                );
                return (Val::Unknown, None);
            }
            _ if given.is_some() => return (Val::Unknown, None),
            _ => {
                cx.error(
                    self.span,
                    format!(
                        "layer `{name}`: `Flatten` needs to know the whole input shape to compute \
                         its size; declare the input with `forward(x: [B, ...]) -> [...];` or \
                         write `Flatten<N>`"
                    ),
                );
                return (Val::Unknown, None);
            }
        };
        let mut product: Option<u128> = Some(1);
        for d in &s.dims[1..] {
            product = match (product, d) {
                (Some(p), Sym::Lit(n)) => p.checked_mul(*n),
                _ => None,
            };
        }
        let out_dim = match (product, given) {
            (Some(p), None) => Sym::Lit(p),
            (Some(p), Some(Sym::Lit(n))) if n != p => {
                cx.error(
                    self.span,
                    format!(
                        "layer `{name}`: `Flatten<{n}>`, but {} `{s}`, which flattens to {p}",
                        self.from.produces()
                    ),
                );
                // Neither size is a safe guess for the layers after this one.
                return (Val::Unknown, None);
            }
            (_, Some(g)) => g,
            (None, None) => {
                let runtime = s.dims[1..].iter().find(|d| matches!(d, Sym::Runtime(_)));
                let msg = match runtime {
                    Some(r) => format!(
                        "layer `{name}`: `{r}` is a runtime size, but `Flatten` needs the sizes \
                         after the batch fixed (numbers or const parameters); {} `{s}`",
                        self.from.produces()
                    ),
                    None => format!(
                        "layer `{name}`: cannot compute the flattened size of `{s}` on stable \
                         Rust (it involves a const parameter); add a const parameter for it and \
                         write `Flatten<N>`: the product is checked when the layer runs"
                    ),
                };
                cx.error(self.span, msg);
                return (Val::Unknown, None);
            }
        };
        let ty = match &out_dim {
            Sym::Lit(n) => {
                let lit = proc_macro2::Literal::u128_unsuffixed(*n);
                let sp = self.span.0;
                let ty: Type = syn::parse_quote_spanned!(sp=> ::neural_arch::layers::Flatten<#lit>);
                Some(ty)
            }
            _ => None,
        };
        let out = Shp {
            full: true,
            dims: vec![s.dims[0].clone(), out_dim],
            dtype: Kind::Float,
        };
        (Val::Known(out), ty)
    }

    /// The output height and width of a window layer, or `None` after reporting why not.
    fn spatial(
        &self,
        cx: &mut Ctxt,
        s: &Shp,
        k: &Sym,
        st: &Sym,
        p: &Sym,
        dil: &Sym,
    ) -> Option<(Sym, Sym)> {
        let mut out = Vec::new();
        for (axis, d) in ["height", "width"].iter().zip(&s.dims[2..4]) {
            match window_out(axis, d, k, st, p, dil) {
                Ok(Some(n)) => out.push(Sym::Lit(n)),
                Ok(None) => out.push(Sym::Opaque(format!("{}'", d))),
                Err(why) => {
                    cx.error(
                        self.span,
                        format!(
                            "layer `{}`: {why}; {} `{s}`",
                            self.name,
                            self.from.produces()
                        ),
                    );
                    return None;
                }
            }
        }
        Some((out[0].clone(), out[1].clone()))
    }

    /// The output sizes: those the type declares (`Const<HO>`) when it does, checked against
    /// the computed ones where both are numbers.
    fn declared(
        &self,
        cx: &mut Ctxt,
        computed: (Sym, Sym),
        declared: Option<(Sym, Sym)>,
    ) -> Option<(Sym, Sym)> {
        let Some((dh, dw)) = declared else {
            return Some(computed);
        };
        for (axis, c, d) in [("height", &computed.0, &dh), ("width", &computed.1, &dw)] {
            if let (Sym::Lit(c), Sym::Lit(d)) = (c, d) {
                if c != d {
                    cx.error(
                        self.span,
                        format!(
                            "layer `{}`: the output {axis} is {c}, but the type declares \
                             `Const<{d}>`",
                            self.name
                        ),
                    );
                    return None;
                }
            }
        }
        Some((dh, dw))
    }

    /// The layer type with every const argument written out and the output sizes appended.
    fn sized(&self, head: &Head, consts: Vec<TokenStream>, sizes: &[&Sym]) -> Option<Type> {
        if head.args.len() > consts.len() {
            // The user wrote the output sizes already; the compiler checks them when it runs.
            return None;
        }
        let mut args = consts;
        args.extend(sizes.iter().map(|s| size_type(s)));
        with_args(self.layer_ty, args)
    }

    fn written_or(head: &Head, i: usize, default: TokenStream) -> TokenStream {
        match head.args.get(i) {
            Some((_, _, a)) => a.to_token_stream(),
            None => default,
        }
    }

    fn conv(
        &self,
        cx: &mut Ctxt,
        c: &Conv,
        head: &Head,
        input: Option<Shp>,
    ) -> (Val, Option<Type>) {
        let Some(s) = self.image(cx, input, Some(&c.ci)) else {
            return (Val::Unknown, None);
        };
        let Some((h, w)) = self.spatial(cx, &s, &c.k, &c.s, &c.p, &c.dil) else {
            return (Val::Unknown, None);
        };
        let Some((h, w)) = self.declared(cx, (h, w), c.out.clone()) else {
            return (Val::Unknown, None);
        };
        let w_ = |i: usize, d: TokenStream| Self::written_or(head, i, d);
        let consts = vec![
            w_(0, quote!()),
            w_(1, quote!()),
            w_(2, quote!()),
            w_(3, quote!(1)),
            w_(4, quote!(0)),
            w_(5, quote!(1)),
            w_(6, quote!(1)),
            w_(7, quote!(true)),
        ];
        let ty = self.sized(head, consts, &[&h, &w]);
        let out = Shp {
            full: true,
            dims: vec![s.dims[0].clone(), c.co.clone(), h, w],
            dtype: Kind::Float,
        };
        (Val::Known(out), ty)
    }

    #[allow(clippy::too_many_arguments)]
    fn pool(
        &self,
        cx: &mut Ctxt,
        k: &Sym,
        st: &Sym,
        p: &Sym,
        out: Option<(Sym, Sym)>,
        head: &Head,
        input: Option<Shp>,
    ) -> (Val, Option<Type>) {
        let Some(s) = self.image(cx, input, None) else {
            return (Val::Unknown, None);
        };
        let Some((h, w)) = self.spatial(cx, &s, k, st, p, &Sym::Lit(1)) else {
            return (Val::Unknown, None);
        };
        let Some((h, w)) = self.declared(cx, (h, w), out) else {
            return (Val::Unknown, None);
        };
        let k_tokens = Self::written_or(head, 0, quote!());
        let consts = vec![
            k_tokens.clone(),
            Self::written_or(head, 1, k_tokens),
            Self::written_or(head, 2, quote!(0)),
        ];
        let ty = self.sized(head, consts, &[&h, &w]);
        let out = Shp {
            full: true,
            dims: vec![s.dims[0].clone(), s.dims[1].clone(), h, w],
            dtype: Kind::Float,
        };
        (Val::Known(out), ty)
    }

    fn patch(
        &self,
        cx: &mut Ctxt,
        c: &Sym,
        d: &Sym,
        p: &Sym,
        head: &Head,
        input: Option<Shp>,
    ) -> (Val, Option<Type>) {
        let Some(s) = self.image(cx, input, Some(c)) else {
            return (Val::Unknown, None);
        };
        let mut grid = Vec::new();
        for (axis, side) in ["height", "width"].iter().zip(&s.dims[2..4]) {
            let message = format!(
                "layer `{}`: the patch size `{p}` must divide the image {axis} `{side}`",
                self.name
            );
            if !divides(cx, self.span.0, message, side, p) {
                return (Val::Unknown, None);
            }
            grid.push(match (side, p) {
                (Sym::Lit(a), Sym::Lit(b)) => Some(a / b),
                _ => None,
            });
        }
        let n = match (grid[0], grid[1]) {
            (Some(a), Some(b)) => Sym::Lit(a * b),
            _ => Sym::Opaque("N".into()),
        };
        let consts = (0..3)
            .map(|i| Self::written_or(head, i, quote!()))
            .collect();
        let ty = self.sized(head, consts, &[&n]);
        let out = Shp {
            full: true,
            dims: vec![s.dims[0].clone(), n, d.clone()],
            dtype: Kind::Float,
        };
        (Val::Known(out), ty)
    }

    fn cross(&self, cx: &mut Ctxt, m: &Sym, input: &Val) -> (Val, Option<Type>) {
        let Val::Tuple(parts) = input else {
            if matches!(input, Val::Known(_)) {
                cx.error(
                    self.span,
                    format!(
                        "layer `{}` attends from queries to keys/values: call it with two inputs, \
                         `{}(q, kv)`",
                        self.name, self.name
                    ),
                );
            }
            return (Val::Unknown, None);
        };
        if !(2..=3).contains(&parts.len()) {
            cx.error(
                self.span,
                format!(
                    "layer `{}` takes two inputs (queries, keys/values) and an optional key mask, \
                     but is given {}",
                    self.name,
                    parts.len()
                ),
            );
            return (Val::Unknown, None);
        }
        for part in &parts[..2] {
            if let Val::Known(s) = part {
                self.check_last(cx, m, s);
            }
        }
        if let (Some(Val::Known(kv)), Some(Val::Known(mask))) = (parts.get(1), parts.get(2)) {
            self.check_mask(cx, kv, mask);
        }
        (parts[0].clone(), None)
    }

    /// `(x, mask)`: attention with a padding mask over the keys.
    fn masked(&self, cx: &mut Ctxt, m: &Sym, parts: &[Val]) -> (Val, Option<Type>) {
        if parts.len() != 2 {
            cx.error(
                self.span,
                format!(
                    "layer `{}` takes its input and optionally a mask, `{}(x, mask)`, but is given \
                     {} inputs",
                    self.name,
                    self.name,
                    parts.len()
                ),
            );
            return (Val::Unknown, None);
        }
        if let Val::Known(x) = &parts[0] {
            self.check_last(cx, m, x);
            if let Val::Known(mask) = &parts[1] {
                self.check_mask(cx, x, mask);
            }
        }
        (parts[0].clone(), None)
    }

    /// A mask `bool[B, T]` over the keys of `[B, T, M]`.
    fn check_mask(&self, cx: &mut Ctxt, keys: &Shp, mask: &Shp) {
        let want = Shp {
            full: keys.full,
            dims: keys.dims[..keys.dims.len().saturating_sub(1)].to_vec(),
            dtype: Kind::Mask,
        };
        let same_dims = mask.dims.len() == want.dims.len()
            && mask
                .dims
                .iter()
                .zip(&want.dims)
                .all(|(a, b)| same(a, b) != Some(false));
        if mask.dtype != Kind::Mask || !same_dims {
            cx.error(
                self.span,
                format!(
                    "layer `{}`: the mask must be `{want}` (one flag per key), but it is `{mask}`",
                    self.name
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::check::Ctxt;

    /// A block generic in its image size writes its convolution's output size; the macro
    /// reads it back instead of leaving the shape unknown.
    #[test]
    fn declared_output_sizes_are_read() -> syn::Result<()> {
        let model: crate::ast::Model = syn::parse_str(
            "struct Down<const HI: usize, const HO: usize> {
                c: Conv2d<4, 8, 3, 2, 1, 1, 1, false, Const<HO>, Const<HO>>,
                p: MaxPool2d<3, 1, 1, Const<HO>, Const<HO>>,
            }
            forward(x: [B, 4, HI, HI]) -> [B, 8, HO, HO];",
        )?;
        let mut cx = Ctxt::default();
        let a = crate::check::check(&model, &mut cx);
        cx.into_result()?;
        let shapes: Vec<String> = a
            .outputs
            .iter()
            .map(|o| o.as_ref().map(|s| s.to_string()).unwrap_or_default())
            .collect();
        assert_eq!(shapes, ["[B, 8, HO, HO]", "[B, 8, HO, HO]"]);

        let model: crate::ast::Model = syn::parse_str(
            "struct M { c: Conv2d<1, 2, 3, 2, 1, 1, 1, true, Const<13>, Const<14>>, }
            forward(x: [B, 1, 28, 28]) -> [B, 2, 13, 14];",
        )?;
        let mut cx = Ctxt::default();
        crate::check::check(&model, &mut cx);
        let errs: Vec<String> = match cx.into_result() {
            Ok(()) => Vec::new(),
            Err(e) => e.into_iter().map(|e| e.to_string()).collect(),
        };
        assert_eq!(
            errs,
            ["layer `c`: the output height is 14, but the type declares `Const<13>`"]
        );
        Ok(())
    }
}
