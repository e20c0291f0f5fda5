//! Compile-fail and pass tests of the model! DSL.
//!
//! Most mistakes are trybuild cases (`tests/ui.rs`), checked with `cargo check` against their
//! expected messages. A size rule on a *generic* model (heads that must divide a width given as
//! a const parameter) is a const assertion that fails only when the model is instantiated with
//! its sizes, during code generation: `cargo build` reports it, `cargo check` does not. Those
//! cases are the two `compile_fail` examples below, which rustdoc builds in full; the message
//! they print is the macro's, checked by its unit test `generic_size_rules_are_left_for_the_build`.
//!
//! Heads that do not divide a generic width, the model built with `Encoder<10, 4>`:
//!
#![doc = concat!(
    "```compile_fail,E0080\n",
    include_str!("../tests/build-time/generic_heads_do_not_divide_width.rs"),
    "```\n"
)]
//!
//! The same rule in a block nested two levels down, checked when the top model is built:
//!
#![doc = concat!(
    "```compile_fail,E0080\n",
    include_str!("../tests/build-time/nested_block_heads_do_not_divide_width.rs"),
    "```\n"
)]
