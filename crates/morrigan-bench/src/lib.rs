//! `morrigan-bench`: a load generator that drives a Morrigan node exactly as devices and
//! operators do, and a bare floor server to state every figure as a ratio.
//!
//! See `BENCHMARKS.md` at the workspace root for the commands and the results.

pub mod bare;
pub mod load;
pub mod run;
pub mod stats;
pub mod sys;
pub mod tracked;
