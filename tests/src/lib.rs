//! Tasks and a harness for the end-to-end tests: the test process is the producer, and workers
//! run as separate processes of the `test-worker` binary (which links these tasks). `node` starts
//! private RabbitMQ nodes and clusters beside the shared broker.

pub mod harness;
pub mod node;
pub mod tasks;
