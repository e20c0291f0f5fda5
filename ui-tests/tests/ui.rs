//! Runs the compile-fail cases (one folder per family of mistakes). The programs the DSL must
//! accept are the `pass` test target (`tests/pass/main.rs`).
//!
//! Regenerate the expected messages with `TRYBUILD=overwrite cargo test -p ui-tests`, then read
//! every `.stderr`: the message must be in the user's words and the caret on the offending layer.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    for family in [
        "shape-mismatch-chain",
        "shape-mismatch-residual",
        "shape-mismatch-repeat",
        "shape-mismatch-nested",
        "shape-mismatch-multi-input",
        "output-mismatch",
        "flatten",
        "unknown-layer",
        "duplicate-name",
        "syntax",
        "runtime-dims",
        "generic-dims",
        "divisibility",
        "image-layers",
        "tokens",
    ] {
        t.compile_fail(format!("tests/ui/{family}/*.rs"));
    }
}
