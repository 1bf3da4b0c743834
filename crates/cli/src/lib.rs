//! The `tether` command's building blocks: the reference node, the
//! strategies and their fleets, the demo and the dashboard.
//!
//! The binary (`src/main.rs`) only parses arguments and calls into here, so
//! tests can run a node in process exactly as the command does.

pub mod demo;
pub mod fleet;
pub mod node;
pub mod sessions;
pub mod strategy;
pub mod up;
