//! What the CUDA test suites share.

/// Asserts that CPU values `a` and CUDA values `b` agree to `tol`, and prints the largest
/// difference (the suites' output is the record of how close the devices are).
pub fn close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    assert!(
        b.iter().all(|v| v.is_finite()),
        "{what}: non-finite on cuda"
    );
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= tol,
        "{what}: max |cpu - cuda| = {worst:e} > {tol:e}; first {:?} vs {:?}",
        &a[..4.min(a.len())],
        &b[..4.min(b.len())]
    );
    eprintln!("{what}: max |cpu - cuda| = {worst:e}");
}
