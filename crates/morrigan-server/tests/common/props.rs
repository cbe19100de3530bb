//! Helpers of the property tests that run against a live node: case counts (`PROPTEST_CASES`
//! overrides them), a runner, and a runtime for the client side.

use proptest::test_runner::{Config, TestRunner};

pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A runner for properties checked against a live node (no regression files: a failure
/// prints its minimal input).
pub fn runner(default_cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases: cases(default_cases),
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    })
}

pub fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}
