//! Model weights in safetensors files, under the upstream checkpoint names.
//!
//! A model's tensor names are its layers' names joined by dots (`h.0.attn.c_attn.weight`);
//! the reference architectures choose their layer names so that these equal the keys of the
//! Hugging Face or torchvision checkpoints. Loading is then a walk over the model's tensors,
//! plus the few conventions a [`LoadOptions`] states: a prefix a base-model file lacks, tensors
//! stored transposed, and upstream buffers that are not parameters.
//!
//! Loading checks everything before it changes anything: a missing, unexpected or wrongly
//! shaped tensor is an [`Error::Checkpoint`] that lists each by name, and the model is left as
//! it was. Saving writes a temporary file and renames it, so a crash never leaves half a file.

use crate::Error;
use dfdx::nn::tensor_collection::{
    RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor, ViewTensorMut, ViewTensorName,
    ViewTensorRef,
};
use dfdx::shapes::{Dtype, HasShape, Shape};
use dfdx::tensor::Tensor;
use dfdx::tensor_ops::Device;
use safetensors::tensor::{Dtype as SafeDtype, TensorView};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// How an upstream checkpoint differs from a plain walk over the model's tensors.
///
/// Patterns name a dot-separated suffix of a key, where `*` stands for one segment:
/// `attn.c_attn.weight` matches `transformer.h.3.attn.c_attn.weight`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// The model's top-level prefix that a base-model file leaves out, with its dot
    /// (`"transformer."`): Hugging Face saves `GPT2Model` as `h.0...`, `GPT2LMHeadModel` as
    /// `transformer.h.0...`; both load.
    pub base_prefix: Option<String>,
    /// 2-D tensors stored as the transpose of the model's layout (GPT-2's `Conv1D` keeps its
    /// weight as `[in, out]`, a linear layer as `[out, in]`).
    pub transposed: Vec<String>,
    /// Upstream tensors that are not parameters of the model and are skipped (causal-mask
    /// buffers, BatchNorm's `num_batches_tracked`, a tied head's duplicate).
    pub ignored: Vec<String>,
    /// Tensors of the model that the file may lack: they keep their current (freshly
    /// initialised) values and are listed in [`LoadReport::fresh`]. This is how a new task
    /// head goes on a pre-trained trunk (HF's "newly initialized" weights), such as a
    /// classifier on a masked-LM checkpoint: `fresh: vec!["classifier.*".into()]`. A pattern
    /// matches a key's dot-separated suffix, `*` standing for any one segment, or, ending in
    /// `.*`, any key under that prefix.
    pub fresh: Vec<String>,
}

impl LoadOptions {
    fn is_fresh(&self, key: &str) -> bool {
        self.fresh.iter().any(|p| match p.strip_suffix(".*") {
            Some(prefix) => key.starts_with(&format!("{prefix}.")),
            None => matches_suffix(p, key),
        })
    }
    fn is_transposed(&self, key: &str) -> bool {
        self.transposed.iter().any(|p| matches_suffix(p, key))
    }
    fn is_ignored(&self, key: &str) -> bool {
        self.ignored.iter().any(|p| matches_suffix(p, key))
    }
}

/// Whether `pattern` (dot-separated, `*` = any one segment) matches the end of `key`.
fn matches_suffix(pattern: &str, key: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    p.len() <= k.len()
        && p.iter()
            .zip(&k[k.len() - p.len()..])
            .all(|(p, k)| *p == "*" || p == k)
}

/// What a load did: how many tensors it set and which upstream tensors it skipped as ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Tensors of the model set from the file.
    pub loaded: usize,
    /// Upstream keys skipped because [`LoadOptions::ignored`] names them.
    pub ignored: Vec<String>,
    /// Model tensors the file lacked and [`LoadOptions::fresh`] allowed: they kept their
    /// values.
    pub fresh: Vec<String>,
}

/// A checkpoint key from dfdx's visitor path: a tensor named `""` (a class token, a logit
/// scale) takes its field's name, without the trailing dot.
fn key(path: String) -> String {
    match path.strip_suffix('.') {
        Some(k) => k.to_string(),
        None => path,
    }
}

/// Every tensor of a model (parameters and buffers such as BatchNorm's running statistics),
/// as `(key, shape)`, in the model's order.
pub fn tensor_shapes<E: Dtype, D: Device<E>, M: TensorCollection<E, D>>(
    m: &M,
) -> Vec<(String, Vec<usize>)> {
    struct Collect(Vec<(String, Vec<usize>)>);
    impl<E: Dtype, D: Device<E>> TensorVisitor<E, D> for Collect {
        type Viewer = (ViewTensorRef, ViewTensorName);
        type Err = std::convert::Infallible;
        type E2 = E;
        type D2 = D;
        fn visit<S: Shape>(
            &mut self,
            _: TensorOptions<S, E, D>,
            (t, name): (&Tensor<S, E, D>, String),
        ) -> Result<Option<Tensor<S, E, D>>, Self::Err> {
            self.0
                .push((key(name), t.shape().concrete().into_iter().collect()));
            Ok(None)
        }
    }
    let mut c = Collect(Vec::new());
    let walked = M::iter_tensors(&mut RecursiveWalker {
        m: (m, String::new()),
        f: &mut c,
    });
    walked.unwrap_or_else(|e| match e {});
    c.0
}

/// The keys of every tensor of a model, in order.
pub fn tensor_names<E: Dtype, D: Device<E>, M: TensorCollection<E, D>>(m: &M) -> Vec<String> {
    tensor_shapes(m).into_iter().map(|(k, _)| k).collect()
}

/// An element type a checkpoint can hold: converted through `f64`.
pub trait CheckpointElem: Dtype {
    /// The safetensors type this element is saved as.
    const SAFE: SafeDtype;
    /// Little-endian bytes of one value.
    fn le_bytes(self) -> Vec<u8>;
    /// The value, from `f64` (rounded to the nearest).
    fn from_checkpoint(x: f64) -> Self;
}

impl CheckpointElem for f32 {
    const SAFE: SafeDtype = SafeDtype::F32;
    fn le_bytes(self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
    fn from_checkpoint(x: f64) -> Self {
        x as f32
    }
}
impl CheckpointElem for f64 {
    const SAFE: SafeDtype = SafeDtype::F64;
    fn le_bytes(self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
    fn from_checkpoint(x: f64) -> Self {
        x
    }
}
impl CheckpointElem for half::f16 {
    const SAFE: SafeDtype = SafeDtype::F16;
    fn le_bytes(self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
    fn from_checkpoint(x: f64) -> Self {
        half::f16::from_f64(x)
    }
}

/// The values of a stored tensor as `f64`, whatever float type the file holds.
fn values_f64(view: &TensorView<'_>, key: &str, path: &Path) -> Result<Vec<f64>, Error> {
    let d = view.data();
    let chunks = |w: usize| d.chunks_exact(w);
    Ok(match view.dtype() {
        SafeDtype::F32 => chunks(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
            .collect(),
        SafeDtype::F64 => chunks(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect(),
        SafeDtype::F16 => chunks(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        SafeDtype::BF16 => chunks(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64())
            .collect(),
        other => {
            return Err(Error::Checkpoint(format!(
                "{}: `{key}` holds {other:?} values; a model's weights must be F32, F64, F16 or \
                 BF16",
                path.display()
            )))
        }
    })
}

fn read_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Checkpoint(format!(
        "cannot read the safetensors file {}: {e}",
        path.display()
    ))
}

/// Loads a model's tensors from a safetensors file with upstream names (see [`LoadOptions`]).
///
/// Every problem is reported at once, by name: tensors the model has and the file lacks,
/// tensors the file has that the model does not (unless ignored), and shape disagreements.
/// On any error the model is unchanged.
pub fn load_safetensors<E, D, M>(
    model: &mut M,
    path: impl AsRef<Path>,
    options: &LoadOptions,
) -> Result<LoadReport, Error>
where
    E: CheckpointElem,
    D: Device<E>,
    M: TensorCollection<E, D>,
{
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| read_error(path, e))?;
    let st = ::safetensors::SafeTensors::deserialize(&bytes).map_err(|e| read_error(path, e))?;
    let stored: BTreeSet<String> = st.names().into_iter().cloned().collect();
    let wanted = tensor_shapes(model);

    // Which stored key feeds each tensor: the key itself, or the key without the base prefix.
    let mut missing = Vec::new();
    let mut fresh = Vec::new();
    let mut wrong = Vec::new();
    let mut plan: BTreeMap<String, (String, bool)> = BTreeMap::new();
    // Reported as of the wrong shape, so not again as unexpected.
    let mut misshapen: BTreeSet<String> = BTreeSet::new();
    for (k, shape) in &wanted {
        let source = if stored.contains(k) {
            Some(k.clone())
        } else {
            options
                .base_prefix
                .as_deref()
                .and_then(|p| k.strip_prefix(p))
                .filter(|short| stored.contains(*short))
                .map(str::to_string)
        };
        let Some(source) = source else {
            if options.is_fresh(k) {
                fresh.push(k.clone());
            } else {
                missing.push(format!("`{k}` {shape:?}"));
            }
            continue;
        };
        let view = st.tensor(&source).map_err(|e| read_error(path, e))?;
        let transposed = options.is_transposed(k) && shape.len() == 2;
        let want: Vec<usize> = if transposed {
            vec![shape[1], shape[0]]
        } else {
            shape.clone()
        };
        if view.shape() != want.as_slice() {
            let layout = if transposed {
                " (stored transposed, as upstream keeps it)"
            } else {
                ""
            };
            wrong.push(format!(
                "`{source}` is {:?} in the file, but the model needs {want:?}{layout}",
                view.shape()
            ));
            misshapen.insert(source);
            continue;
        }
        plan.insert(k.clone(), (source, transposed));
    }
    let used: BTreeSet<&String> = plan.values().map(|(s, _)| s).collect();
    let mut ignored = Vec::new();
    let mut unexpected = Vec::new();
    for k in &stored {
        if used.contains(k) || misshapen.contains(k) {
            continue;
        }
        if options.is_ignored(k) {
            ignored.push(k.clone());
        } else {
            unexpected.push(format!(
                "`{k}` {:?}",
                st.tensor(k).map(|v| v.shape().to_vec()).unwrap_or_default()
            ));
        }
    }
    if !(missing.is_empty() && wrong.is_empty() && unexpected.is_empty()) {
        let mut msg = format!(
            "{} does not fit this model ({} tensors in the file, {} in the model):",
            path.display(),
            stored.len(),
            wanted.len()
        );
        for (what, list) in [
            ("missing from the file", &missing),
            ("of the wrong shape", &wrong),
            ("in the file but not in the model", &unexpected),
        ] {
            if list.is_empty() {
                continue;
            }
            msg.push_str(&format!("\n  {} {what}:", list.len()));
            for item in list.iter().take(8) {
                msg.push_str(&format!("\n    {item}"));
            }
            if list.len() > 8 {
                msg.push_str(&format!("\n    ... and {} more", list.len() - 8));
            }
        }
        msg.push_str(
            "\nIs it a checkpoint of this architecture and preset? Keys and shapes must equal \
             the model's (`tensor_shapes` lists them).",
        );
        return Err(Error::Checkpoint(msg));
    }

    // Every check passed: convert and copy.
    let mut values = BTreeMap::new();
    for (k, (source, transposed)) in &plan {
        let view = st.tensor(source).map_err(|e| read_error(path, e))?;
        let mut v = values_f64(&view, source, path)?;
        if *transposed {
            let (r, c) = (view.shape()[0], view.shape()[1]);
            v = (0..r * c).map(|i| v[(i % r) * c + i / r]).collect();
        }
        values.insert(k.clone(), v);
    }
    struct Set<'a>(&'a BTreeMap<String, Vec<f64>>, usize);
    impl<E: CheckpointElem, D: Device<E>> TensorVisitor<E, D> for Set<'_> {
        type Viewer = (ViewTensorMut, ViewTensorName);
        type Err = D::Err;
        type E2 = E;
        type D2 = D;
        fn visit<S: Shape>(
            &mut self,
            _: TensorOptions<S, E, D>,
            (t, name): (&mut Tensor<S, E, D>, String),
        ) -> Result<Option<Tensor<S, E, D>>, Self::Err> {
            if let Some(v) = self.0.get(&key(name)) {
                let data: Vec<E> = v.iter().map(|&x| E::from_checkpoint(x)).collect();
                t.copy_from(&data);
                self.1 += 1;
            }
            Ok(None)
        }
    }
    let mut set = Set(&values, 0);
    M::iter_tensors(&mut RecursiveWalker {
        m: (model, String::new()),
        f: &mut set,
    })
    .map_err(|e| Error::Device(format!("{e:?}")))?;
    Ok(LoadReport {
        loaded: set.1,
        ignored,
        fresh,
    })
}

/// Saves every tensor of a model under its key, atomically (a temporary file, then a rename).
///
/// The file loads back with [`load_safetensors`] and default options, and in PyTorch with
/// `safetensors.torch.load_file`.
pub fn save_safetensors<E, D, M>(model: &M, path: impl AsRef<Path>) -> Result<(), Error>
where
    E: CheckpointElem,
    D: Device<E>,
    M: TensorCollection<E, D>,
{
    save_safetensors_with(model, path, &LoadOptions::default())
}

/// [`save_safetensors`] in the upstream layout that `options` describes: the tensors
/// [`LoadOptions::transposed`] names are written transposed, so the file loads back with the
/// same options (what a `model!`'s `save_safetensors` does) and upstream code reads it as its
/// own (GPT-2's `Conv1D` weights as `[in, out]`).
pub fn save_safetensors_with<E, D, M>(
    model: &M,
    path: impl AsRef<Path>,
    options: &LoadOptions,
) -> Result<(), Error>
where
    E: CheckpointElem,
    D: Device<E>,
    M: TensorCollection<E, D>,
{
    struct Collect(Vec<(String, Vec<usize>, Vec<u8>)>);
    impl<E: CheckpointElem, D: Device<E>> TensorVisitor<E, D> for Collect {
        type Viewer = (ViewTensorRef, ViewTensorName);
        type Err = std::convert::Infallible;
        type E2 = E;
        type D2 = D;
        fn visit<S: Shape>(
            &mut self,
            _: TensorOptions<S, E, D>,
            (t, name): (&Tensor<S, E, D>, String),
        ) -> Result<Option<Tensor<S, E, D>>, Self::Err> {
            let bytes = t.as_vec().into_iter().flat_map(E::le_bytes).collect();
            let shape = t.shape().concrete().into_iter().collect();
            self.0.push((key(name), shape, bytes));
            Ok(None)
        }
    }
    let path = path.as_ref();
    let mut c = Collect(Vec::new());
    let walked = M::iter_tensors(&mut RecursiveWalker {
        m: (model, String::new()),
        f: &mut c,
    });
    walked.unwrap_or_else(|e| match e {});
    for (k, shape, data) in &mut c.0 {
        if shape.len() == 2 && options.is_transposed(k) {
            let (r, cols) = (shape[0], shape[1]);
            let w = data.len() / (r * cols).max(1);
            let src = std::mem::take(data);
            // Element (i, j) of the [r, cols] tensor goes to (j, i) of the [cols, r] one.
            *data = (0..r * cols)
                .flat_map(|n| {
                    let at = ((n % r) * cols + n / r) * w;
                    src[at..at + w].to_vec()
                })
                .collect();
            *shape = vec![cols, r];
        }
    }
    let views =
        c.0.iter()
            .map(|(k, shape, data)| {
                TensorView::new(E::SAFE, shape.clone(), data).map(|v| (k.as_str(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Checkpoint(format!("cannot encode the model: {e:?}")))?;
    let bytes = safetensors::tensor::serialize(views, &None)
        .map_err(|e| Error::Checkpoint(format!("cannot encode the model: {e:?}")))?;
    write_atomically(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// that `path` holds either the old contents or the new, never a part.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let fail =
        |e: std::io::Error| Error::Checkpoint(format!("cannot write {}: {e}", path.display()));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(fail)?;
    f.write_all(bytes).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    crate::model! {
        struct Tiny {
            fc: Linear<3, 2>,
            #[key = "LayerNorm"]
            norm: LayerNorm<2>,
            cls: ClsToken<2>,
        }
    }

    crate::model! {
        #[checkpoint(base = "transformer.", ignored("lm_head.weight"))]
        struct TiedLm { wte: Embedding<7, 4>, ln: LayerNorm<4> }
        forward(ids: usize[B, T]) -> [B, T, 7] {
            let h = ln(wte(ids));
            wte.unembed(h)
        }
    }

    /// A model's own `load_safetensors` applies its `#[checkpoint]` conventions, and a tied
    /// output layer (`wte.unembed`) gets the gradient of both uses.
    #[test]
    fn tied_model_with_conventions() -> Result<(), Error> {
        let dev = Cpu::default();
        let mut m = dev.build_module::<TiedLm, f64>();
        assert_eq!(TiedLm::PARAMS, 7 * 4 + 8);
        let opts = TiedLmModule::<TiedLm, f64, (), ()>::load_options();
        assert_eq!(opts.base_prefix.as_deref(), Some("transformer."));
        let ids = dev.tensor([[1usize, 2, 6]]);
        let logits = m.try_forward(ids.clone())?;
        assert_eq!(logits.shape(), &(Const::<1>, Const::<3>, Const::<7>));
        let path = temp("tied.safetensors");
        m.save_safetensors(&path)?;
        let mut n = dev.build_module::<TiedLm, f64>();
        assert_eq!(n.load_safetensors(&path)?.loaded, 3);
        assert_eq!(n.try_forward(ids.clone())?.as_vec(), logits.as_vec());
        std::fs::remove_file(path).ok();
        let report = crate::gradcheck::check_param_grads(&mut m, |m, g| {
            m.forward(ids.trace(g)).square().sum::<Rank0, _>()
        });
        assert!(report.max_abs_err < 1e-6, "{report}");
        Ok(())
    }

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("na-ckpt-{}-{name}", std::process::id()))
    }

    #[test]
    fn keys_follow_layer_names_and_key_attributes() {
        let dev = Cpu::default();
        let m = dev.build_module::<Tiny, f32>();
        assert_eq!(
            tensor_names(&m),
            [
                "fc.weight",
                "fc.bias",
                "LayerNorm.weight",
                "LayerNorm.bias",
                "cls"
            ]
        );
    }

    #[test]
    fn saves_and_loads_back_exactly() -> Result<(), Error> {
        let dev = Cpu::default();
        let a = dev.build_module::<Tiny, f32>();
        let mut b = dev.build_module::<Tiny, f32>();
        let path = temp("roundtrip.safetensors");
        save_safetensors(&a, &path)?;
        let r = load_safetensors(&mut b, &path, &LoadOptions::default())?;
        assert_eq!(r.loaded, 5);
        assert_eq!(a.fc.weight.as_vec(), b.fc.weight.as_vec());
        assert_eq!(a.cls.token.as_vec(), b.cls.token.as_vec());
        std::fs::remove_file(path).ok();
        Ok(())
    }

    #[test]
    fn every_problem_is_named_and_nothing_changes() -> Result<(), Error> {
        let dev = Cpu::default();
        let mut m = dev.build_module::<Tiny, f32>();
        let before = m.fc.weight.as_vec();
        let w = [0u8; 4 * 6];
        let b = [0u8; 4 * 3];
        let views = vec![
            (
                "fc.weight",
                TensorView::new(SafeDtype::F32, vec![2, 3], &w).unwrap(),
            ),
            (
                "fc.bias",
                TensorView::new(SafeDtype::F32, vec![3], &b).unwrap(),
            ),
            (
                "extra",
                TensorView::new(SafeDtype::F32, vec![3], &b).unwrap(),
            ),
        ];
        let path = temp("bad.safetensors");
        ::safetensors::tensor::serialize_to_file(views, &None, &path).unwrap();
        let e = load_safetensors(&mut m, &path, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`LayerNorm.weight` [2]"), "{e}");
        assert!(
            e.contains("`fc.bias` is [3] in the file, but the model needs [2]"),
            "{e}"
        );
        assert!(e.contains("`extra` [3]"), "{e}");
        assert!(e.contains("3 missing from the file"), "{e}");
        assert!(e.contains("1 in the file but not in the model"), "{e}");
        assert_eq!(m.fc.weight.as_vec(), before);
        std::fs::remove_file(path).ok();
        Ok(())
    }

    #[test]
    fn fresh_tensors_may_be_missing_and_keep_their_values() -> Result<(), Error> {
        let dev = Cpu::default();
        let mut m = dev.build_module::<Tiny, f32>();
        let norm = m.norm.weight.as_vec();
        let w: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let b = [0u8; 4 * 2];
        let views = vec![
            (
                "fc.weight",
                TensorView::new(SafeDtype::F32, vec![2, 3], &w).unwrap(),
            ),
            (
                "fc.bias",
                TensorView::new(SafeDtype::F32, vec![2], &b).unwrap(),
            ),
        ];
        let path = temp("trunk.safetensors");
        ::safetensors::tensor::serialize_to_file(views, &None, &path).unwrap();
        let mut opts = LoadOptions {
            fresh: vec!["LayerNorm.*".into()],
            ..Default::default()
        };
        let e = load_safetensors(&mut m, &path, &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("1 missing from the file") && e.contains("`cls`"),
            "{e}"
        );
        opts.fresh.push("cls".into());
        let r = load_safetensors(&mut m, &path, &opts)?;
        assert_eq!(r.loaded, 2);
        assert_eq!(r.fresh, ["LayerNorm.weight", "LayerNorm.bias", "cls"]);
        assert_eq!(m.fc.weight.as_vec(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(m.norm.weight.as_vec(), norm);
        std::fs::remove_file(path).ok();
        Ok(())
    }

    #[test]
    fn conventions_prefix_transpose_and_ignore() -> Result<(), Error> {
        let dev = Cpu::default();
        let mut m = dev.build_module::<Tiny, f32>();
        let mut want = dev.build_module::<Tiny, f32>();
        want.fc.weight = dev.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        let path = temp("conv.safetensors");
        save_safetensors(&want, &path)?;
        // Rewrite the file as upstream would: a prefix on every key, `fc.weight` transposed,
        // and a buffer the model does not have.
        let bytes = std::fs::read(&path).unwrap();
        let st = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let wt: Vec<u8> = [1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut views = vec![(
            "fc.weight".to_string(),
            TensorView::new(SafeDtype::F32, vec![3, 2], &wt).unwrap(),
        )];
        for (k, v) in st.tensors() {
            if k != "fc.weight" {
                views.push((k, v));
            }
        }
        let zero = [0u8; 8];
        views.push((
            "fc.num_batches_tracked".into(),
            TensorView::new(SafeDtype::I64, vec![], &zero).unwrap(),
        ));
        let up = temp("upstream.safetensors");
        ::safetensors::tensor::serialize_to_file(views, &None, &up).unwrap();
        let opts = LoadOptions {
            base_prefix: None,
            transposed: vec!["fc.weight".into()],
            ignored: vec!["num_batches_tracked".into()],
            fresh: vec![],
        };
        let r = load_safetensors(&mut m, &up, &opts)?;
        assert_eq!(r.ignored, ["fc.num_batches_tracked"]);
        assert_eq!(m.fc.weight.as_vec(), want.fc.weight.as_vec());
        assert!(matches_suffix(
            "h.*.attn.bias",
            "transformer.h.11.attn.bias"
        ));
        assert!(!matches_suffix("attn.bias", "h.1.attn.c_attn.bias"));
        // Saving with the options writes the upstream layout, which loads back as it was.
        let mut n = dev.build_module::<Tiny, f32>();
        save_safetensors_with(&want, &up, &opts)?;
        let bytes = std::fs::read(&up).unwrap();
        let st = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("fc.weight").unwrap().shape(), [3, 2]);
        assert_eq!(st.tensor("fc.weight").unwrap().data(), &wt[..]);
        load_safetensors(&mut n, &up, &opts)?;
        assert_eq!(n.fc.weight.as_vec(), want.fc.weight.as_vec());
        std::fs::remove_file(path).ok();
        std::fs::remove_file(up).ok();
        Ok(())
    }
}
