//! The programs the DSL must accept, each declared at a module's top level as a user would write
//! it, then built and run.
//!
//! They are an ordinary test target rather than trybuild pass cases: trybuild would build (not
//! just check) its whole project for them, dfdx and faer included, a second time in its own
//! target folder; here they share the workspace's test build.

mod chain;
mod graph_residual;
mod nested;
mod no_const_params;
mod repeated_block;
mod two_inputs_two_outputs;

#[test]
fn chain_with_const_generic_width() {
    chain::check();
}

#[test]
fn graph_with_a_residual_sum() {
    graph_residual::check();
}

#[test]
fn nested_and_residual_wrapped_models() {
    nested::check();
}

#[test]
fn model_without_const_parameters() {
    no_const_params::check();
}

#[test]
fn repeated_block() {
    repeated_block::check();
}

#[test]
fn two_inputs_two_outputs() {
    two_inputs_two_outputs::check();
}
