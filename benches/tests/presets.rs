//! The presets the benches time still train.

use neural_arch::prelude::*;
use neural_arch_benches::presets;

/// Every preset's step runs, gives a finite loss, and learns its fixed batch: the loss after a
/// few steps is below the first one. Guards the benches against measuring a step that no longer
/// trains.
#[test]
fn every_preset_step_trains() {
    let dev = Cpu::seed_from_u64(0);
    for mut p in presets(&dev) {
        let first = p.step().expect("step");
        let mut last = first;
        for _ in 0..2 {
            last = p.step().expect("step");
        }
        assert!(
            first.is_finite() && last.is_finite(),
            "{}: {first} {last}",
            p.name()
        );
        assert!(last < first, "{}: loss {first} -> {last}", p.name());
    }
}
