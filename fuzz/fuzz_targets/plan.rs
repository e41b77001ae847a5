#![no_main]
// Property: reshardfs::fuzzing::plan, against the gpt fixture loaded once.

use std::sync::{Arc, OnceLock};

use reshardfs::checkpoint::source::Source;

fn source() -> Arc<Source> {
    static SOURCE: OnceLock<Arc<Source>> = OnceLock::new();
    SOURCE
        .get_or_init(|| {
            let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/gpt-dp2-tp2-pp2-bf16");
            Arc::new(Source::open(&dir).unwrap())
        })
        .clone()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| reshardfs::fuzzing::plan(source(), data));
