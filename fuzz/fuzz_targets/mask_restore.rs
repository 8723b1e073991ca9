//! Fuzz target `mask_restore`: the property in `tests/support/fuzz_checks.rs`.
#![no_main]

#[path = "../../tests/support/fuzz_checks.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::mask_restore(data));
