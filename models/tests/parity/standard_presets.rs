//! Every standard preset compiles all the way to its builder: taking the address of a function
//! that builds it makes the compiler generate that code, and with it evaluate every
//! compile-time check the layers and the DSL attach to building (heads dividing widths, RoPE's
//! even head width, computed image sizes). Nothing here allocates the billion-parameter models:
//! the functions are never called.

use neural_arch::prelude::*;
use neural_arch_models::bert::{BertBase, BertBaseForMaskedLM};
use neural_arch_models::clip::ClipVitB32;
use neural_arch_models::gpt2::{Gpt2Medium, Gpt2Small};
use neural_arch_models::llama::TinyLlama;
use neural_arch_models::resnet::{ResNet18, ResNet34, ResNet50};
use neural_arch_models::vit::VitB16;

type Builder = fn(&Cpu) -> Result<usize, ModelError>;

/// Builds preset `B` and counts its parameters.
fn build<B>(dev: &Cpu) -> Result<usize, ModelError>
where
    B: BuildOnDevice<Cpu, f32>,
    Built<B, f32, Cpu>: NumParams<f32, Cpu>,
{
    Ok(dev.try_build_module::<B, f32>()?.num_trainable_params())
}

#[test]
fn every_standard_preset_compiles_to_its_builder() {
    let builders: [(&str, Builder, usize); 10] = [
        ("gpt2 small", build::<Gpt2Small>, Gpt2Small::PARAMS),
        ("gpt2 medium", build::<Gpt2Medium>, Gpt2Medium::PARAMS),
        ("tinyllama", build::<TinyLlama>, TinyLlama::PARAMS),
        ("bert base", build::<BertBase>, BertBase::PARAMS),
        (
            "bert base mlm",
            build::<BertBaseForMaskedLM>,
            BertBaseForMaskedLM::PARAMS,
        ),
        ("vit b16", build::<VitB16>, VitB16::PARAMS),
        ("clip vit-b-32", build::<ClipVitB32>, ClipVitB32::PARAMS),
        ("resnet18", build::<ResNet18>, ResNet18::PARAMS),
        ("resnet34", build::<ResNet34>, ResNet34::PARAMS),
        ("resnet50", build::<ResNet50>, ResNet50::PARAMS),
    ];
    for (name, f, params) in builders {
        assert!(params > 10_000_000, "{name}: {params}");
        // The pointer is enough: the builder is compiled, never run.
        std::hint::black_box(f);
    }
}
