//! `morrigan login`: a user token for a server, kept (0600) for the other commands.

use clap::Args;
use morrigan_protocol::api::{LoginRequest, TokenResponse};
use morrigan_protocol::paths;
use reqwest::Method;

use super::api::{Api, Login};
use super::common::{parse, password_from_stdin, prompt, request_body};
use crate::Failure;

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// Server URL [default: the one of the last login, else http://127.0.0.1:8080].
    #[arg(long, env = "MORRIGAN_URL")]
    url: Option<String>,
    /// Identity name.
    #[arg(long, default_value = "admin")]
    name: String,
    /// Read the password from standard input (else MORRIGAN_PASSWORD, else a prompt).
    #[arg(long)]
    password_stdin: bool,
}

pub async fn run(args: LoginArgs) -> Result<(), Failure> {
    let api = Api::anonymous(args.url.as_deref())?;
    let password = if args.password_stdin {
        password_from_stdin()?
    } else if let Some(pw) = std::env::var("MORRIGAN_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty())
    {
        pw
    } else {
        prompt(&format!("Password for {} at {}: ", args.name, api.base))?
    };
    let body = request_body(&LoginRequest {
        name: args.name.clone(),
        password,
        kind: None,
    })?;
    let reply = api
        .call(Method::POST, api.url(paths::AUTH, &[], &[]), Some(body))
        .await?;
    let TokenResponse { token, .. } = parse(&reply)?;
    let saved = Login {
        url: api.base.clone(),
        token,
    }
    .save()?;
    println!(
        "logged in to {} as {} (token saved in {})",
        api.base,
        args.name,
        saved.display()
    );
    Ok(())
}
