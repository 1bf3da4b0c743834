//! The `tether` command's building blocks: the reference node and the demo.
//!
//! The binary (`src/main.rs`) only parses arguments and calls into here, so
//! tests can run a node in process exactly as the command does.

pub mod demo;
pub mod node;
pub mod report;
pub mod sessions;
pub mod up;
