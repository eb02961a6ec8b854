//! Where the Fly API token comes from, and its refresh after a 401.
//!
//! The token is resolved as flyctl resolves it, first hit wins: a token given to the builder;
//! `FLY_ACCESS_TOKEN`, then `FLY_API_TOKEN`; the `access_token` of flyctl's `~/.fly/config.yml`
//! (written by `fly auth login`); then the app's own [`TokenSource`]. On a 401 the token is
//! resolved once more, by one request for all those that met the 401 together, and the request
//! is retried once. Firebrand never runs `flyctl`: minting tokens is the user's decision.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::token::FlyToken;
use super::FlyError;

/// A token source of the app's own, tried last: a vault, a database, a command the user
/// chooses. Called when the backend first needs a token, and again after Fly answered 401.
///
/// ```
/// use firebrand::backend::fly::TokenSource;
/// use futures_util::future::BoxFuture;
///
/// #[derive(Debug)]
/// struct Vault;
///
/// impl TokenSource for Vault {
///     fn name(&self) -> String {
///         "vault secret fly/deploy".into()
///     }
///
///     fn fetch(&self) -> BoxFuture<'_, Result<String, Box<dyn std::error::Error + Send + Sync>>> {
///         Box::pin(async { Ok("fm2_...".to_owned()) })
///     }
/// }
/// ```
pub trait TokenSource: fmt::Debug + Send + Sync + 'static {
    /// Where the tokens come from, for logs and errors ("from vault secret fly/deploy"). Never
    /// the token.
    fn name(&self) -> String;

    /// Fetches a token.
    ///
    /// # Errors
    /// Why no token could be had; the request that needed it fails with
    /// [`FlyError::Token`](super::FlyError::Token).
    fn fetch(&self) -> BoxFuture<'_, Result<String, Box<dyn std::error::Error + Send + Sync>>>;
}

pub(crate) use crate::backend::runner_spec::Lookup;

/// The variables flyctl reads a token from, in its order.
const TOKEN_VARS: [&str; 2] = ["FLY_ACCESS_TOKEN", "FLY_API_TOKEN"];

/// Where a token was found: said in logs and errors, in place of the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    Explicit,
    Env(&'static str),
    ConfigFile(PathBuf),
    Source(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Explicit => write!(f, "from .token()"),
            Origin::Env(name) => write!(f, "from {name}"),
            Origin::ConfigFile(path) => write!(f, "from {}", path.display()),
            Origin::Source(name) => write!(f, "from {name}"),
        }
    }
}

/// The places a token is looked for, in order.
#[derive(Clone)]
pub(crate) struct TokenChain {
    pub(crate) explicit: Option<String>,
    pub(crate) lookup: Lookup,
    pub(crate) source: Option<Arc<dyn TokenSource>>,
}

impl fmt::Debug for TokenChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenChain")
            .field("explicit", &self.explicit.as_ref().map(|_| "<redacted>"))
            .field("source", &self.source.as_ref().map(|s| s.name()))
            .finish_non_exhaustive()
    }
}

impl TokenChain {
    /// The first token the places that need no call hold, if any: checked when the backend is
    /// built, so that a missing token is a build error unless a source may still supply one.
    pub(crate) fn resolve_local(&self) -> Result<Option<(FlyToken, Origin)>, FlyError> {
        if let Some(token) = &self.explicit {
            return Ok(Some((FlyToken::new(token)?, Origin::Explicit)));
        }
        for name in TOKEN_VARS {
            if let Some(token) = (self.lookup)(name).filter(|t| !t.trim().is_empty()) {
                return Ok(Some((FlyToken::new(&token)?, Origin::Env(name))));
            }
        }
        let Some(path) = self.config_file() else {
            return Ok(None);
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => match access_token(&text) {
                Some(token) => Ok(Some((FlyToken::new(&token)?, Origin::ConfigFile(path)))),
                None => Ok(None),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FlyError::Config(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    /// The first token any place holds, the source last.
    pub(crate) async fn resolve(&self) -> Result<(FlyToken, Origin), FlyError> {
        if let Some(found) = self.resolve_local()? {
            return Ok(found);
        }
        let Some(source) = &self.source else {
            return Err(FlyError::Config(NO_TOKEN.into()));
        };
        let origin = Origin::Source(source.name());
        let token = source.fetch().await.map_err(|e| FlyError::Token {
            origin: origin.to_string(),
            reason: e.to_string(),
        })?;
        Ok((FlyToken::new(&token)?, origin))
    }

    /// `~/.fly/config.yml`, where `fly auth login` writes its token.
    fn config_file(&self) -> Option<PathBuf> {
        let home = (self.lookup)("HOME").filter(|h| !h.is_empty())?;
        Some(PathBuf::from(home).join(".fly").join("config.yml"))
    }
}

/// What a build without any token says.
pub(crate) const NO_TOKEN: &str =
    "no Fly API token: set FLY_API_TOKEN (`fly tokens create deploy`, \
     then `fly secrets set FLY_API_TOKEN=...`), run `fly auth login` (it writes \
     ~/.fly/config.yml), call .token(), or give a .token_source()";

/// The `access_token` of flyctl's `config.yml`: a top-level `access_token: <value>` line,
/// the value plain, `"double"` or `'single'` quoted, as flyctl's YAML writer leaves it. Only
/// this one key is read, so no YAML parser is linked for it; anything else in the file is
/// ignored.
fn access_token(yaml: &str) -> Option<String> {
    let line = yaml
        .lines()
        .find_map(|line| line.strip_prefix("access_token:"))?;
    let value = line.trim();
    let token = if let Some(quoted) = value.strip_prefix('"') {
        quoted.split_once('"')?.0.to_owned()
    } else if let Some(quoted) = value.strip_prefix('\'') {
        // In a single-quoted YAML scalar, `''` is one quote.
        let mut token = String::new();
        let mut rest = quoted;
        loop {
            let (part, after) = rest.split_once('\'')?;
            token.push_str(part);
            match after.strip_prefix('\'') {
                Some(more) => {
                    token.push('\'');
                    rest = more;
                }
                None => break token,
            }
        }
    } else {
        // A plain scalar ends at a comment.
        value
            .split(" #")
            .next()
            .unwrap_or_default()
            .trim_end()
            .to_owned()
    };
    Some(token).filter(|t| !t.trim().is_empty())
}

/// The token in use, and how many times it was resolved.
struct Current {
    token: FlyToken,
    origin: Origin,
    generation: u64,
}

/// The token the API client sends, resolved when first needed and again after a 401.
pub(crate) struct Credentials {
    chain: TokenChain,
    current: parking_lot::Mutex<Option<Arc<Current>>>,
    /// Held while the token is resolved: requests that met a 401 together wait here for the
    /// one resolution, and find the new token when they get it.
    resolving: tokio::sync::Mutex<()>,
}

/// A token handed to one request: the token, where it came from, and its generation, to ask
/// for a refresh of this very token.
#[derive(Clone)]
pub(crate) struct Lent(Arc<Current>);

impl Lent {
    pub(crate) fn token(&self) -> &FlyToken {
        &self.0.token
    }

    pub(crate) fn origin(&self) -> &Origin {
        &self.0.origin
    }
}

impl Credentials {
    pub(crate) fn new(chain: TokenChain, resolved: Option<(FlyToken, Origin)>) -> Self {
        let current = resolved.map(|(token, origin)| {
            tracing::info!(source = %origin, "Fly API token resolved");
            Arc::new(Current {
                token,
                origin,
                generation: 1,
            })
        });
        Self {
            chain,
            current: parking_lot::Mutex::new(current),
            resolving: tokio::sync::Mutex::new(()),
        }
    }

    /// The token to send now, resolved first if there is none yet.
    pub(crate) async fn token(&self) -> Result<Lent, FlyError> {
        if let Some(current) = self.current.lock().clone() {
            return Ok(Lent(current));
        }
        self.resolve_after(0).await
    }

    /// A new token, after Fly refused `refused` with a 401: resolved once for every request
    /// that was refused with the same token.
    pub(crate) async fn refresh(&self, refused: &Lent) -> Result<Lent, FlyError> {
        self.resolve_after(refused.0.generation).await
    }

    /// Resolves the token unless one newer than `generation` is already there.
    async fn resolve_after(&self, generation: u64) -> Result<Lent, FlyError> {
        let _resolving = self.resolving.lock().await;
        if let Some(current) = self.current.lock().clone() {
            if current.generation > generation {
                return Ok(Lent(current));
            }
        }
        let (token, origin) = self.chain.resolve().await?;
        tracing::info!(source = %origin, generation = generation + 1, "Fly API token resolved");
        let current = Arc::new(Current {
            token,
            origin,
            generation: generation + 1,
        });
        *self.current.lock() = Some(Arc::clone(&current));
        Ok(Lent(current))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flyctl_s_config_file_yields_its_access_token() {
        let yaml = "access_token: fm2_abc\nlast_login: 2026-11-30\nwire_guard_state: {}\n";
        assert_eq!(access_token(yaml).as_deref(), Some("fm2_abc"));
        assert_eq!(access_token("access_token: \"\"\n"), None);
        assert_eq!(access_token("other: 1\n"), None);
        assert_eq!(access_token(": not yaml ["), None);
        assert_eq!(
            access_token("last_login: x\naccess_token: \"fm2_q d\"\n").as_deref(),
            Some("fm2_q d")
        );
        assert_eq!(
            access_token("access_token: 'fm2_it''s'\n").as_deref(),
            Some("fm2_it's")
        );
        assert_eq!(
            access_token("access_token: fm2_abc # a comment\n").as_deref(),
            Some("fm2_abc")
        );
        // Only the top-level key: an indented one belongs to some other map.
        assert_eq!(access_token("other:\n  access_token: nested\n"), None);
    }

    #[test]
    fn origins_name_the_place_never_the_token() {
        assert_eq!(
            Origin::Env("FLY_API_TOKEN").to_string(),
            "from FLY_API_TOKEN"
        );
        assert_eq!(
            Origin::ConfigFile("/home/u/.fly/config.yml".into()).to_string(),
            "from /home/u/.fly/config.yml"
        );
    }
}
