//! Tasks and a harness for the end-to-end tests: the test process is the producer, and workers
//! run as separate processes of the `test-worker` binary (which links these tasks).

pub mod harness;
pub mod tasks;
