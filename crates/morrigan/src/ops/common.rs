//! What every operator command shares: the `--url`/`--json` options, reading a password, and
//! turning the server's answer into either the raw JSON (`--json`) or a typed record.

use std::io::{IsTerminal, Read};

use clap::Args;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Failure;

/// Where and how: shared by every operator command.
#[derive(Args, Debug, Clone)]
pub struct Remote {
    /// Server URL [default: the one of the last `morrigan login`, else http://127.0.0.1:8080].
    #[arg(long, env = "MORRIGAN_URL", global = true)]
    pub url: Option<String>,
    /// Print the server's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Reads a password: all of standard input (one trailing newline removed).
pub fn password_from_stdin() -> Result<String, Failure> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| Failure::msg(format!("cannot read the password from stdin: {e}")))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err(Failure::msg("empty password on stdin"));
    }
    Ok(text.to_string())
}

/// Reads a password from the terminal, without echo.
pub fn prompt(label: &str) -> Result<String, Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure::msg(
            "no password given: use --password-stdin (or MORRIGAN_PASSWORD for login)",
        ));
    }
    rpassword::prompt_password(label)
        .map_err(|e| Failure::msg(format!("cannot read the password: {e}")))
}

/// Prints an answer exactly as the server sent it (trailing whitespace aside).
pub fn print_raw(body: &str) {
    println!("{}", body.trim_end());
}

/// With `--json`, prints the answer as received and gives `None`; otherwise reads it as the
/// protocol type `T`, for a table.
pub fn answer<T: DeserializeOwned>(body: &str, as_json: bool) -> Result<Option<T>, Failure> {
    if as_json {
        print_raw(body);
        return Ok(None);
    }
    parse(body).map(Some)
}

/// Reads an answer as the protocol type `T`.
pub fn parse<T: DeserializeOwned>(body: &str) -> Result<T, Failure> {
    serde_json::from_str(body)
        .map_err(|e| Failure::msg(format!("unexpected answer from the server: {e}")))
}

/// A request body as JSON text.
pub fn request_body<T: Serialize>(body: &T) -> Result<String, Failure> {
    serde_json::to_string(body).map_err(|e| Failure::msg(format!("cannot encode the request: {e}")))
}
