//! Parsing: the token stream of a `model!` invocation into a syntax tree.
//!
//! Parsing only rejects what cannot be read at all; meaning (names, shapes) is checked in
//! `check.rs`, which reports every problem it finds.

use proc_macro2::Span;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{bracketed, parenthesized, Attribute, Block, Expr, Ident, Token, Type, Visibility};

/// One `model!` declaration.
pub struct Model {
    pub attrs: Vec<Attribute>,
    pub vis: Visibility,
    pub name: Ident,
    /// The const parameters, in order: `const H: usize`.
    pub consts: Vec<Ident>,
    pub fields: Vec<Field>,
    pub forward: Option<Forward>,
    /// `#[checkpoint(...)]`: how upstream checkpoints differ from the model's keys.
    pub checkpoint: Checkpoint,
}

/// The conventions of `#[checkpoint(base = "transformer.", transposed("c_attn.weight"),
/// ignored("attn.bias"))]`.
#[derive(Default)]
pub struct Checkpoint {
    pub base: Option<String>,
    pub transposed: Vec<String>,
    pub ignored: Vec<String>,
}

fn parse_checkpoint(attr: &Attribute, out: &mut Checkpoint) -> syn::Result<()> {
    attr.parse_nested_meta(|meta| {
        if meta.path.is_ident("base") {
            out.base = Some(meta.value()?.parse::<syn::LitStr>()?.value());
            return Ok(());
        }
        let list = if meta.path.is_ident("transposed") {
            &mut out.transposed
        } else if meta.path.is_ident("ignored") {
            &mut out.ignored
        } else {
            return Err(meta.error(
                "`#[checkpoint(..)]` takes `base = \"prefix.\"`, `transposed(\"key\", ..)` and \
                 `ignored(\"key\", ..)`",
            ));
        };
        let content;
        parenthesized!(content in meta.input);
        let keys = Punctuated::<syn::LitStr, Token![,]>::parse_terminated(&content)?;
        list.extend(keys.iter().map(|k| k.value()));
        Ok(())
    })
}

/// One named layer.
pub struct Field {
    pub attrs: Vec<Attribute>,
    pub name: Ident,
    pub layer: Type,
    /// `Some(count)` for `name: [Layer; count]`.
    pub repeat: Option<Expr>,
    /// The whole declaration `name: Layer`, for error spans.
    pub span: crate::check::Loc,
    /// The checkpoint key, `#[key = "LayerNorm"]`; the field name when absent.
    pub key: String,
    /// `#[recompute]`: gradient checkpointing (block by block for a repeated layer).
    pub recompute: bool,
}

/// `forward(x: [B, 784], ...) -> [B, 10]` with an optional body.
pub struct Forward {
    pub kw: Ident,
    pub params: Vec<(Ident, ShapeSpec)>,
    pub outputs: Vec<ShapeSpec>,
    /// `true` when the outputs were written as a tuple `([..], [..])`.
    pub tuple_output: bool,
    pub body: Option<Block>,
}

/// A shape written in the DSL: `[B, T, 768]`.
#[derive(Clone)]
pub struct ShapeSpec {
    pub dims: Vec<DimSpec>,
    pub span: Span,
    /// What the tensor holds: float features `[B, T]`, token ids `usize[B, T]`, or a mask
    /// `bool[B, T]`.
    pub dtype: Kind,
}

/// What a tensor of the DSL holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Features in the model's element type (`f32`, ...), with the gradient tape.
    Float,
    /// Token ids, `usize`, carrying the tape into an embedding.
    Ids,
    /// A boolean mask (`true` = attend), without a tape.
    Mask,
}

impl Kind {
    /// The prefix of a shape in messages: `usize[B, T]`.
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Float => "",
            Kind::Ids => "usize",
            Kind::Mask => "bool",
        }
    }
}

/// One dimension of a written shape.
#[derive(Clone)]
pub enum DimSpec {
    /// A literal or a braced constant expression of literals: `784`, `{28 * 28}`.
    Lit(u128, Span),
    /// An identifier: a const parameter of the model (fixed) or a runtime size (`B`, `T`).
    Ident(Ident),
}

impl Parse for Model {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut attrs = input.call(Attribute::parse_outer)?;
        let mut checkpoint = Checkpoint::default();
        let mut kept = Vec::new();
        for a in attrs.drain(..) {
            if a.path().is_ident("checkpoint") {
                parse_checkpoint(&a, &mut checkpoint)?;
            } else {
                kept.push(a);
            }
        }
        let attrs = kept;
        let vis: Visibility = input.parse()?;
        input.parse::<Token![struct]>()?;
        let name: Ident = input.parse()?;
        let generics: syn::Generics = input.parse()?;
        if input.peek(Token![where]) {
            let wc: syn::WhereClause = input.parse()?;
            return Err(syn::Error::new_spanned(
                wc,
                "model! takes no where clause: its parameters are sizes, `const NAME: usize`",
            ));
        }
        let mut consts = Vec::new();
        for p in &generics.params {
            match p {
                syn::GenericParam::Const(c) if is_usize(&c.ty) && c.default.is_none() => {
                    consts.push(c.ident.clone())
                }
                _ => {
                    return Err(syn::Error::new_spanned(
                        p,
                        "model! parameters are sizes: write them as `const NAME: usize`",
                    ))
                }
            }
        }
        let content;
        syn::braced!(content in input);
        let mut fields = Vec::new();
        while !content.is_empty() {
            fields.push(content.parse::<Field>()?);
            if content.is_empty() {
                break;
            }
            content.parse::<Token![,]>()?;
        }
        let forward = if input.is_empty() {
            None
        } else {
            Some(input.parse::<Forward>()?)
        };
        if !input.is_empty() {
            return Err(input.error("unexpected tokens after the forward declaration"));
        }
        Ok(Model {
            checkpoint,
            attrs,
            vis,
            name,
            consts,
            fields,
            forward,
        })
    }
}

fn is_usize(ty: &Type) -> bool {
    matches!(ty, Type::Path(p) if p.qself.is_none() && p.path.is_ident("usize"))
}

impl Parse for Field {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut attrs = input.call(Attribute::parse_outer)?;
        let name: Ident = input.parse()?;
        let mut key = name.to_string();
        let mut recompute = false;
        let mut keep = Vec::new();
        for a in attrs.drain(..) {
            if a.path().is_ident("doc") {
                keep.push(a);
            } else if a.path().is_ident("recompute") {
                if !matches!(a.meta, syn::Meta::Path(_)) {
                    return Err(syn::Error::new_spanned(
                        &a.meta,
                        "`#[recompute]` takes no arguments: it marks the layer (each block of a \
                         repeated one) for gradient checkpointing",
                    ));
                }
                recompute = true;
            } else if a.path().is_ident("key") {
                // Upstream checkpoints use names that cannot be Rust fields (`self`,
                // `LayerNorm`): the field keeps a Rust name, the parameters the upstream one.
                let value = &a.meta.require_name_value()?.value;
                match value {
                    syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(s),
                        ..
                    }) if !s.value().is_empty() && !s.value().contains('.') => key = s.value(),
                    other => {
                        return Err(syn::Error::new_spanned(
                            other,
                            "`#[key = \"...\"]` takes the checkpoint name of this layer, a \
                             non-empty string without dots",
                        ))
                    }
                }
            } else {
                return Err(syn::Error::new_spanned(
                    a,
                    "a layer takes doc comments, `#[key = \"name\"]` (its checkpoint name) and \
                     `#[recompute]` (gradient checkpointing) as attributes",
                ));
            }
        }
        let attrs = keep;
        input.parse::<Token![:]>()?;
        let ty: Type = input.parse()?;
        let span = crate::check::Loc(name.span(), last_span(&ty));
        let (layer, repeat) = match ty {
            Type::Array(a) => (*a.elem, Some(a.len)),
            other => (other, None),
        };
        Ok(Field {
            attrs,
            name,
            layer,
            repeat,
            span,
            key,
            recompute,
        })
    }
}

/// The span of the last token of a type, so that field spans cover `name: Type<..>`.
fn last_span(ty: &Type) -> Span {
    let tokens = quote::ToTokens::to_token_stream(ty);
    tokens
        .into_iter()
        .last()
        .map(|t| t.span())
        .unwrap_or_else(Span::call_site)
}

impl Parse for Forward {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let kw: Ident = input.parse()?;
        if kw != "forward" {
            return Err(syn::Error::new(
                kw.span(),
                "expected `forward(x: [B, ...]) -> [...]` after the layers",
            ));
        }
        let content;
        parenthesized!(content in input);
        let mut params = Vec::new();
        let list =
            Punctuated::<(Ident, ShapeSpec), Token![,]>::parse_terminated_with(&content, |p| {
                let name: Ident = p.parse()?;
                p.parse::<Token![:]>()?;
                Ok((name, p.parse::<ShapeSpec>()?))
            })?;
        params.extend(list);
        if params.is_empty() {
            return Err(syn::Error::new(
                kw.span(),
                "`forward` needs at least one input",
            ));
        }
        input.parse::<Token![->]>().map_err(|e| {
            syn::Error::new(
                e.span(),
                "`forward` must declare its output shape: `-> [B, 10]`",
            )
        })?;
        let (outputs, tuple_output) = if input.peek(syn::token::Paren) {
            let content;
            parenthesized!(content in input);
            let list = Punctuated::<ShapeSpec, Token![,]>::parse_terminated(&content)?;
            (list.into_iter().collect(), true)
        } else {
            (vec![input.parse::<ShapeSpec>()?], false)
        };
        let body = if input.peek(Token![;]) {
            input.parse::<Token![;]>()?;
            None
        } else {
            Some(input.parse::<Block>()?)
        };
        Ok(Forward {
            kw,
            params,
            outputs,
            tuple_output,
            body,
        })
    }
}

impl Parse for ShapeSpec {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let dtype =
            if input.peek(Ident) {
                let ty: Ident = input.parse()?;
                match ty.to_string().as_str() {
                    "usize" => Kind::Ids,
                    "bool" => Kind::Mask,
                    _ => return Err(syn::Error::new(
                        ty.span(),
                        "a shape is `[B, T, 768]` (float features), `usize[B, T]` (token ids) or \
                         `bool[B, T]` (a mask)",
                    )),
                }
            } else {
                Kind::Float
            };
        let content;
        let bracket = bracketed!(content in input);
        let dims = Punctuated::<DimSpec, Token![,]>::parse_terminated(&content)?;
        Ok(ShapeSpec {
            dims: dims.into_iter().collect(),
            span: bracket.span.open(),
            dtype,
        })
    }
}

impl Parse for DimSpec {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        if input.peek(Ident) {
            return Ok(DimSpec::Ident(input.parse()?));
        }
        if input.peek(syn::token::Brace) {
            let content;
            let brace = syn::braced!(content in input);
            let e: Expr = content.parse()?;
            return match crate::check::eval_const(&e) {
                Some(v) => Ok(DimSpec::Lit(v, brace.span.join())),
                None => Err(syn::Error::new(
                    brace.span.join(),
                    "a braced size must be arithmetic on literals (`{28 * 28}`): stable Rust \
                     cannot compute with const parameters inside types",
                )),
            };
        }
        let lit: syn::LitInt = input.parse().map_err(|e| {
            syn::Error::new(
                e.span(),
                "a dimension is a number, a const parameter or a runtime size name",
            )
        })?;
        Ok(DimSpec::Lit(lit.base10_parse()?, lit.span()))
    }
}
