#![no_main]
// Property: reshardfs::fuzzing::safetensors_header.
libfuzzer_sys::fuzz_target!(|data: &[u8]| reshardfs::fuzzing::safetensors_header(data));
