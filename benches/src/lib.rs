//! Benchmarks of neural-arch. The benches live in `benches/`; run them with
//! `cargo bench -p neural-arch-benches`.
