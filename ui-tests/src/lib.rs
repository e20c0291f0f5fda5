//! Compile-fail and pass tests of the model! DSL.
