//! Skipping a test whose backing service (PostgreSQL, a browser) is missing: a notice, or a
//! failure where skipping is not allowed.

use std::io::Write;

/// Skips the calling test for `why`: fails instead when `MORRIGAN_TEST_REQUIRE_SERVICES` is
/// set (as `.ci/run` sets it); otherwise prints a notice naming the test, written to standard
/// error directly (`eprintln!` is captured by the test harness and shown only for failing
/// tests) and appended to the file `MORRIGAN_TEST_SKIP_LOG` names, if set (`.ci/run` lists
/// those beside its summary). The caller returns right after.
pub fn skip(why: &str) {
    if std::env::var_os("MORRIGAN_TEST_REQUIRE_SERVICES").is_some() {
        panic!("{why}, and MORRIGAN_TEST_REQUIRE_SERVICES is set: not skipping");
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    // One write per line, so that the lines of tests running at once do not interleave.
    let line = format!("notice: skipped {test}: {why}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os("MORRIGAN_TEST_SKIP_LOG")
        && let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = file.write_all(line.as_bytes());
    }
}

/// The URL in the environment variable `var` (e.g. `MORRIGAN_TEST_POSTGRES_URL`), or `None`
/// after [`skip`] when it is unset or empty.
pub fn service_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            skip(&format!("{var} is not set"));
            None
        }
    }
}
