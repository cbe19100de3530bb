//! Tokens as the device sees them: opaque strings it stores, forwards and peeks into.
//!
//! The device never verifies a token (it has no keys); it only reads the connection token's
//! `reportUrl` and, for logs, a token's id. Tokens are secrets: nothing here logs or formats one.

use std::fs;
use std::io;
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use url::Url;

use crate::Error;

/// The file, inside the state directory, that holds the newest identity token.
pub const IDENTITY_TOKEN_FILE: &str = "identity-token";

/// Extracts the identity token from a provisioning response body.
///
/// The original server answers `POST /api/core/client/provision` with the token as a JSON string
/// literal (`"eyJ..."`, quotes included) and a `text/html` content type; other tools hand out the
/// bare token. Both, with surrounding whitespace, give the bare token.
pub fn parse_identity_token(body: &str) -> String {
    let body = body.trim();
    if body.starts_with('"') {
        if let Ok(s) = serde_json::from_str::<String>(body) {
            return s.trim().to_string();
        }
        return body.trim_matches('"').trim().to_string();
    }
    body.to_string()
}

/// The claims a device reads from a token, without verifying it.
///
/// Deliberately lenient (every field optional) rather than
/// [`morrigan_protocol::api::Claims`]: tokens of the original server carry no `aud` and no `jti`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PeekedClaims {
    pub sub: Option<String>,
    pub iss: Option<String>,
    pub jti: Option<String>,
    pub iat: Option<i64>,
    pub exp: Option<i64>,
    #[serde(rename = "reportUrl")]
    pub report_url: Option<String>,
}

#[derive(Deserialize)]
struct PeekedHeader {
    kid: Option<String>,
}

fn decode_part<T: serde::de::DeserializeOwned>(token: &str, index: usize) -> Result<T, Error> {
    let parts: Vec<&str> = token.split('.').collect();
    let [_, _, _] = parts[..] else {
        return Err(Error::Protocol(
            "token is not a JWT (three dot-separated parts)".into(),
        ));
    };
    let part = parts.get(index).copied().unwrap_or_default();
    // Some encoders pad base64url; the JWT spec says not to, accept both.
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|e| Error::Protocol(format!("token part {index} is not base64url: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Protocol(format!("token part {index} is not a JSON object: {e}")))
}

/// Decodes a JWT's payload without verifying the signature.
pub fn peek_claims(token: &str) -> Result<PeekedClaims, Error> {
    decode_part(token, 1)
}

/// A loggable name for a token: its `jti`, else its header `kid` (the original's token record
/// id), else only its length. Never the token itself.
pub fn token_label(token: &str) -> String {
    if let Ok(PeekedClaims { jti: Some(jti), .. }) = peek_claims(token) {
        return format!("jti={jti}");
    }
    if let Ok(PeekedHeader { kid: Some(kid) }) = decode_part::<PeekedHeader>(token, 0) {
        return format!("kid={kid}");
    }
    format!("len={}", token.len())
}

/// Checks that a token can travel in an HTTP header and looks like a JWT, so that garbage from a
/// peer is neither stored nor sent.
pub(crate) fn check_token_shape(token: &str) -> Result<(), Error> {
    let ok_chars = token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='));
    if token.is_empty() || !ok_chars || token.split('.').count() != 3 {
        return Err(Error::Protocol(format!(
            "token is not a JWT ({})",
            token_label(token)
        )));
    }
    Ok(())
}

/// Maps a connection token's `reportUrl` to the WebSocket URL to open: `http` → `ws`,
/// `https` → `wss`; `ws`/`wss` pass unchanged. The original server hands out `http(s)` URLs
/// (its Node client accepted them as they are).
pub fn report_url_to_ws(report_url: &str) -> Result<Url, Error> {
    let mut url = Url::parse(report_url)
        .map_err(|e| Error::Protocol(format!("reportUrl {report_url:?} is not a URL: {e}")))?;
    let scheme = match url.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => {
            return Err(Error::Protocol(format!(
                "reportUrl scheme {other:?} is not http, https, ws or wss"
            )));
        }
    };
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Error::Protocol(format!(
            "reportUrl {report_url:?} has no host"
        )));
    }
    url.set_scheme(scheme).map_err(|()| {
        Error::Protocol(format!("cannot map reportUrl {report_url:?} to {scheme}"))
    })?;
    Ok(url)
}

/// The identity token on disk: `<state_dir>/identity-token`, replaced atomically.
///
/// A device that loses power while saving must find either the old or the new token, never a
/// truncated one: [`morrigan_files::write_private`] writes a temporary file in the same
/// directory, syncs it, renames it over the old file and syncs the directory. The file is
/// readable by its owner only (0600), the directory created 0700.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

impl TokenStore {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: state_dir.into(),
        }
    }

    /// The token file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(IDENTITY_TOKEN_FILE)
    }

    /// The stored token, or `None` when there is none (or only whitespace).
    pub fn load(&self) -> Result<Option<String>, Error> {
        let path = self.path();
        match fs::read_to_string(&path) {
            Ok(s) => {
                let token = parse_identity_token(&s);
                Ok((!token.is_empty()).then_some(token))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Replaces the stored token atomically.
    pub fn save(&self, token: &str) -> Result<(), Error> {
        self.save_inner(token)
            .map_err(|e| Error::io(format!("saving {}", self.path().display()), e))
    }

    fn save_inner(&self, token: &str) -> io::Result<()> {
        morrigan_files::create_private_dir(&self.dir)?;
        morrigan_files::write_private(&self.path(), token.as_bytes())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use morrigan_protocol::api::{Claims, audience};
    use std::path::Path;

    /// An unsigned JWT with the given payload (the device never checks signatures).
    pub(crate) fn fake_jwt(payload: &serde_json::Value) -> String {
        let enc = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.c2ln",
            enc(&serde_json::json!({"alg":"EdDSA","typ":"JWT","kid":"k1"})),
            enc(payload)
        )
    }

    #[test]
    fn provisioning_body_quoted_or_not() {
        assert_eq!(parse_identity_token("\"a.b.c\""), "a.b.c");
        assert_eq!(parse_identity_token("  \"a.b.c\"\n"), "a.b.c");
        assert_eq!(parse_identity_token("a.b.c"), "a.b.c");
        assert_eq!(parse_identity_token("a.b.c\r\n"), "a.b.c");
        assert_eq!(parse_identity_token("\"a.b.c"), "a.b.c");
        assert_eq!(parse_identity_token(""), "");
    }

    #[test]
    fn reads_morrigan_claims() {
        let claims = Claims {
            sub: "conn-1".into(),
            iss: "node-1".into(),
            aud: audience::CONNECTION.into(),
            iat: 100,
            exp: 160,
            jti: "tok-1".into(),
            report_url: Some("https://h:8443/api/core/connection/connect".into()),
        };
        let token = fake_jwt(&serde_json::to_value(&claims).unwrap());
        let peeked = peek_claims(&token).unwrap();
        assert_eq!(peeked.sub.as_deref(), Some("conn-1"));
        assert_eq!(peeked.jti.as_deref(), Some("tok-1"));
        assert_eq!(peeked.iat, Some(100));
        assert_eq!(peeked.report_url, claims.report_url);
        assert_eq!(token_label(&token), "jti=tok-1");
        check_token_shape(&token).unwrap();
    }

    #[test]
    fn reads_original_claims_without_jti() {
        // The original's payload: no aud, no jti; the record id is the header kid.
        let token = fake_jwt(&serde_json::json!({
            "sub": "e5294880", "iss": "a12bc6c7",
            "reportUrl": "http://localhost:18080/api/core/connection/connect",
            "iat": 1795688156, "exp": 1795688216
        }));
        let peeked = peek_claims(&token).unwrap();
        assert_eq!(peeked.jti, None);
        assert_eq!(
            peeked.report_url.as_deref(),
            Some("http://localhost:18080/api/core/connection/connect")
        );
        assert_eq!(token_label(&token), "kid=k1");
    }

    #[test]
    fn rejects_non_jwts() {
        for bad in ["", "abc", "a.b", "a.b.c.d", "a.!!!.c", "a.bm90IGpzb24.c"] {
            assert!(peek_claims(bad).is_err(), "{bad:?}");
        }
        assert_eq!(token_label("secret"), "len=6");
        assert!(check_token_shape("a.b c.d").is_err());
        assert!(check_token_shape("a.b").is_err());
    }

    #[test]
    fn report_url_mapping() {
        let cases = [
            (
                "http://h:1/api/core/connection/connect",
                "ws://h:1/api/core/connection/connect",
            ),
            ("https://h/x?y=1", "wss://h/x?y=1"),
            ("ws://h/x", "ws://h/x"),
            ("wss://h:9/x", "wss://h:9/x"),
            ("HTTP://H/x", "ws://h/x"),
        ];
        for (input, want) in cases {
            assert_eq!(report_url_to_ws(input).unwrap().as_str(), want, "{input}");
        }
        for bad in ["ftp://h/x", "not a url", "/relative", "file:///etc/passwd"] {
            assert!(report_url_to_ws(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn store_round_trip_atomic_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path().join("state"));
        assert_eq!(store.load().unwrap(), None);
        store.save("a.b.c").unwrap();
        assert_eq!(store.load().unwrap().as_deref(), Some("a.b.c"));
        store.save("d.e.f").unwrap();
        assert_eq!(store.load().unwrap().as_deref(), Some("d.e.f"));
        // Only the token file is left behind: the temporary file was renamed, not copied.
        let names: Vec<_> = fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [IDENTITY_TOKEN_FILE]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(store.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let mode = fs::metadata(dir.path().join("state"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700);
        }
    }

    #[test]
    fn store_reads_quoted_files_and_ignores_blank_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        fs::write(store.path(), "\"a.b.c\"\n").unwrap();
        assert_eq!(store.load().unwrap().as_deref(), Some("a.b.c"));
        fs::write(store.path(), "  \n").unwrap();
        assert_eq!(store.load().unwrap(), None);
    }

    /// The names in `dir`.
    fn names(dir: &Path) -> Vec<std::ffi::OsString> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn failed_save_keeps_the_old_token() {
        // A state directory whose path is so long that the token file's path fits under Linux's
        // PATH_MAX (4096 bytes with the NUL) but the temporary file's (".identity-token.<16
        // hex>.tmp", 22 bytes longer) does not: the save fails before the old file is touched,
        // in the directory the old token is read from. Unix permissions cannot make it fail:
        // the tests run as root.
        let root = tempfile::tempdir().unwrap();
        let mut dir = root.path().to_path_buf();
        let target = 4070;
        while dir.as_os_str().len() < target {
            let room = target - dir.as_os_str().len() - 1;
            dir.push("d".repeat(room.clamp(1, 200)));
        }
        fs::create_dir_all(&dir).unwrap();
        let store = TokenStore::new(&dir);
        assert!(store.path().as_os_str().len() < 4096);
        fs::write(store.path(), "a.b.c").unwrap();
        assert_eq!(store.load().unwrap().as_deref(), Some("a.b.c"));

        let err = store.save("x.y.z").unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert_eq!(store.load().unwrap().as_deref(), Some("a.b.c"));
        assert_eq!(names(&dir), [IDENTITY_TOKEN_FILE]);
    }

    #[test]
    fn failed_rename_removes_the_temporary_file() {
        // A directory where the token file should be: the temporary file is written, the rename
        // over the directory fails, and the temporary file must go.
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        fs::create_dir(store.path()).unwrap();
        fs::write(store.path().join("kept"), "x").unwrap();

        let err = store.save("x.y.z").unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert_eq!(names(dir.path()), [IDENTITY_TOKEN_FILE]);
        assert_eq!(names(&store.path()), ["kept"]);
    }

    #[test]
    fn save_replaces_the_file_whole_never_rewrites_it_in_place() {
        // A reader that opened the old token before a save still reads the old token whole:
        // the new one went to another file, renamed over the old name (a save that truncated
        // and rewrote the file would let a crash leave it empty or partial).
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        store.save("old.token.value").unwrap();
        let mut before = fs::File::open(store.path()).unwrap();
        store.save("new.token.value").unwrap();
        let mut old = String::new();
        std::io::Read::read_to_string(&mut before, &mut old).unwrap();
        assert_eq!(old, "old.token.value");
        assert_eq!(store.load().unwrap().as_deref(), Some("new.token.value"));
    }
}
