#![no_main]
// Property: reshardfs::fuzzing::shard_id.
libfuzzer_sys::fuzz_target!(|data: &[u8]| reshardfs::fuzzing::shard_id(data));
