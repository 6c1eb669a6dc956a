//! waferscale: a cycle-approximate emulator of a wafer-scale dataflow engine, with a companion GPU
//! model running the same dataflow graph.
//!
//! The pipeline, each stage plain data with a printer:
//! `config.json + workload` -> [`model::Model`] -> [`graph::Graph`] -> (plan -> mesh program ->
//! engine -> report + trace; see ARCHITECTURE.md for the stages that exist today).
//!
//! The CLI (`src/main.rs`, `src/cli.rs`) is a thin layer over these functions.

pub mod compile;
pub mod engine;
pub mod error;
pub mod functional;
pub mod gpu;
pub mod graph;
pub mod hw;
pub mod mesh;
pub mod model;
pub mod report;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace;

pub use error::Error;
