//! Rules for operator identities: names, passwords, functions. Sessions are verified by
//! [`crate::credentials`]; passwords hashed by [`crate::passwords`]; who may do what is
//! checked on the [`crate::routes::extract::User`] of each request.

use crate::error::ApiError;

pub use morrigan_protocol::functions;

/// Identity names: 1-64 of `[A-Za-z0-9_.-]`, the whole name and nothing else (no prefix or
/// suffix match: the original's regex was not anchored).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Passwords: 8-1024 characters.
pub fn valid_password(password: &str) -> bool {
    (8..=1024).contains(&password.chars().count())
}

/// Every entry must be a known function: an unknown one is refused with the list of known
/// ones, so an identity never holds a function that grants nothing.
pub fn validate_functions(list: &[String]) -> Result<(), ApiError> {
    for f in list {
        if !functions::ALL.contains(&f.as_str()) {
            return Err(ApiError::bad_request(format!(
                "Unknown function '{f}'. Known functions: {}.",
                functions::ALL.join(", ")
            )));
        }
    }
    Ok(())
}
