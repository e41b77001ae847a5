#![no_main]
// Property: reshardfs::fuzzing::metadata, against a private copy of the tp4
// fixture's rank files (each run rewrites its metadata.json).

use std::path::PathBuf;
use std::sync::OnceLock;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap().keep();
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tp4-f32/iteration_00000005");
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), tmp.join(e.file_name())).unwrap();
        }
        tmp
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| reshardfs::fuzzing::metadata(dir(), data));
