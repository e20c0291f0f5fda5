//! The accuracy report's numbers stay where they were measured.

#[test]
fn layers_are_accurate_and_gradients_exact() {
    let r = neural_arch_examples::accuracy::report();
    for row in &r.precision {
        assert!(
            row.f32.max_abs_err < 2e-6,
            "{}: f32 max error {:e}",
            row.name,
            row.f32.max_abs_err
        );
        assert!(
            row.f16.max_abs_err < 1e-2,
            "{}: f16 max error {:e}",
            row.name,
            row.f16.max_abs_err
        );
        // bf16's spacing is 2⁻⁴ at 8, the grid's largest output.
        assert!(
            row.bf16.max_abs_err < 6.25e-2,
            "{}: bf16 max error {:e} (f16 {:e})",
            row.name,
            row.bf16.max_abs_err,
            row.f16.max_abs_err
        );
    }
    for g in &r.gradients {
        let worst = g
            .params
            .iter()
            .chain(&g.input)
            .map(|s| s.max_abs_err)
            .fold(0.0, f64::max);
        assert!(worst < 1e-6, "{}: gradient error {worst:e}", g.layer);
    }
    assert!(r.comparison().contains("against the original framework"));
}
