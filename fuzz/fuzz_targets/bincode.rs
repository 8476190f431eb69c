#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| amqp_tasks::fuzzing::bincode(data));
