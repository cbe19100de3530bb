//! The REST client of the operator commands, and where they keep the login.

use std::path::{Path, PathBuf};
use std::time::Duration;

use morrigan_protocol::api::ErrorBody;
use reqwest::Method;
use url::Url;

use crate::Failure;

/// Where operator commands talk to when neither `--url`, `MORRIGAN_URL` nor a login says.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";
const TIMEOUT: Duration = Duration::from_secs(30);
const TOKEN_FILE: &str = "token";
const URL_FILE: &str = "url";

/// The server base URL: `http(s)://host[:port][/prefix]`, without a trailing `/` and without the
/// connection provider's path (so that the URL an agent is given works here too).
pub fn normalize_url(raw: &str) -> Result<Url, Failure> {
    // MORRIGAN_URL may hold the agent's comma-separated list: the first one is the server.
    let raw = raw.split(',').next().unwrap_or_default().trim();
    let mut url =
        Url::parse(raw).map_err(|e| Failure::msg(format!("invalid server URL {raw:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Failure::msg(format!(
            "invalid server URL {raw:?}: use http:// or https://"
        )));
    }
    let path = url.path().trim_end_matches('/');
    let path = path
        .strip_suffix(morrigan_protocol::paths::CONNECTION)
        .unwrap_or(path)
        .to_string();
    url.set_path(&path);
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

fn same_server(a: &Url, b: &Url) -> bool {
    a.as_str().trim_end_matches('/') == b.as_str().trim_end_matches('/')
}

/// The directory holding the cached login: `MORRIGAN_CONFIG_DIR`, else
/// `$XDG_CONFIG_HOME/morrigan`, else `~/.config/morrigan`.
pub fn config_dir() -> Result<PathBuf, Failure> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("MORRIGAN_CONFIG_DIR") {
        return Ok(dir);
    }
    if let Some(dir) = var("XDG_CONFIG_HOME").filter(|d| d.is_absolute()) {
        return Ok(dir.join("morrigan"));
    }
    var("HOME")
        .map(|home| home.join(".config").join("morrigan"))
        .ok_or_else(|| {
            Failure::msg("no config directory: set MORRIGAN_CONFIG_DIR, XDG_CONFIG_HOME or HOME")
        })
}

/// The cached login: the server URL and the user token for it.
pub struct Login {
    pub url: Url,
    pub token: String,
}

impl Login {
    pub fn load() -> Option<Login> {
        let dir = config_dir().ok()?;
        let url = std::fs::read_to_string(dir.join(URL_FILE)).ok()?;
        let token = std::fs::read_to_string(dir.join(TOKEN_FILE)).ok()?;
        Some(Login {
            url: normalize_url(url.trim()).ok()?,
            token: token.trim().to_string(),
        })
    }

    /// Saves both files (0600, each replaced atomically) and returns where the token is.
    pub fn save(&self) -> Result<PathBuf, Failure> {
        let dir = config_dir()?;
        morrigan_files::create_private_dir(&dir)
            .map_err(|e| Failure::msg(format!("cannot create {}: {e}", dir.display())))?;
        write_private(&dir.join(URL_FILE), format!("{}\n", self.url).as_bytes())?;
        let path = dir.join(TOKEN_FILE);
        write_private(&path, format!("{}\n", self.token).as_bytes())?;
        Ok(path)
    }
}

/// Writes a secret with [`morrigan_files::write_private`] (atomically replaced, mode 0600), a
/// failure as one line naming the file.
pub fn write_private(path: &Path, content: &[u8]) -> Result<(), Failure> {
    morrigan_files::write_private(path, content)
        .map_err(|e| Failure::msg(format!("cannot write {}: {e}", path.display())))
}

/// A server's REST API, as one operator.
pub struct Api {
    pub base: Url,
    token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    /// Without a user token (for `login`).
    pub fn anonymous(url: Option<&str>) -> Result<Api, Failure> {
        let base = match url {
            Some(u) => normalize_url(u)?,
            None => match Login::load() {
                Some(login) => login.url,
                None => normalize_url(DEFAULT_URL)?,
            },
        };
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .user_agent(concat!("morrigan-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Failure::msg(format!("HTTP client: {e}")))?;
        Ok(Api {
            base,
            token: None,
            http,
        })
    }

    /// With the user token of `MORRIGAN_USER_TOKEN`, else of the cached login — only when that
    /// login is for this very server: a token is never sent to another one.
    pub fn authenticated(url: Option<&str>) -> Result<Api, Failure> {
        let mut api = Api::anonymous(url)?;
        if let Some(token) = std::env::var("MORRIGAN_USER_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
        {
            api.token = Some(token.trim().to_string());
            return Ok(api);
        }
        match Login::load() {
            Some(login) if same_server(&login.url, &api.base) => api.token = Some(login.token),
            Some(login) => {
                return Err(Failure::msg(format!(
                    "not logged in to {} (the saved login is for {}): run `morrigan login --url {}`",
                    api.base, login.url, api.base
                )));
            }
            None => {
                return Err(Failure::msg(format!(
                    "not logged in to {}: run `morrigan login`",
                    api.base
                )));
            }
        }
        Ok(api)
    }

    /// `base` + `path` (a route such as `/api/core/client`) + `ids` as further path segments
    /// (each percent-encoded, `/` included) + query pairs.
    pub fn url(&self, path: &str, ids: &[&str], query: &[(&str, String)]) -> Url {
        let mut url = self.base.clone();
        {
            let mut segments = url.path_segments_mut().expect("an http(s) URL has a path");
            segments.pop_if_empty();
            segments.extend(path.split('/').filter(|s| !s.is_empty()));
            segments.extend(ids);
        }
        if !query.is_empty() {
            url.query_pairs_mut()
                .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        url
    }

    /// One call. `Ok` is the body of a 2xx answer, as received; anything else is a [`Failure`]
    /// with the server's reason.
    pub async fn call(
        &self,
        method: Method,
        url: Url,
        body: Option<String>,
    ) -> Result<String, Failure> {
        let (status, text) = self.request(method, url, body, &[]).await?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        Err(refusal(status, &text))
    }

    /// One call with extra headers, whatever its status: `(status, body as received)`. Only a
    /// failure to talk to the server at all is an `Err`.
    pub async fn request(
        &self,
        method: Method,
        url: Url,
        body: Option<String>,
        headers: &[(&str, String)],
    ) -> Result<(u16, String), Failure> {
        let mut request = self.http.request(method, url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request.send().await.map_err(|e| self.unreachable(&e))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| self.unreachable(&e))?;
        Ok((status, text))
    }

    pub async fn get(
        &self,
        path: &str,
        ids: &[&str],
        query: &[(&str, String)],
    ) -> Result<String, Failure> {
        self.call(Method::GET, self.url(path, ids, query), None)
            .await
    }

    fn unreachable(&self, e: &reqwest::Error) -> Failure {
        // The innermost cause says what happened ("Connection refused (os error 111)").
        let mut cause: &dyn std::error::Error = e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        let what = if e.is_timeout() {
            "timed out".to_string()
        } else {
            cause.to_string()
        };
        Failure::msg(format!("cannot reach {}: {what}", self.base))
    }
}

/// The server's reason for a non-2xx answer, as one line: `<reason> (HTTP <status>)`, with a
/// hint on 401. Every error the server answers is an `ErrorBody`; anything else (a proxy's
/// page) is shown as an excerpt.
pub fn refusal_reason(status: u16, text: &str) -> String {
    let reason = serde_json::from_str::<ErrorBody>(text)
        .ok()
        .map(|body| body.reason)
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| {
            let excerpt: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
            let excerpt: String = excerpt.chars().take(200).collect();
            if excerpt.is_empty() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status}: {excerpt}")
            }
        });
    let reason = reason
        .trim()
        .trim_end_matches('.')
        .replace(['\n', '\r'], " ");
    match status {
        401 => format!("{reason} (HTTP 401): run `morrigan login`"),
        code => format!("{reason} (HTTP {code})"),
    }
}

/// A non-2xx answer as a [`Failure`] (exit code 1) with [`refusal_reason`].
pub fn refusal(status: u16, text: &str) -> Failure {
    Failure::msg(refusal_reason(status, text))
}
