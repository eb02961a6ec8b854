//! The Fly API token and its `Authorization` scheme.

use reqwest::header::HeaderValue;

use super::FlyError;

/// Prefixes of the macaroon tokens that `fly tokens deploy` and friends print; they go with the
/// `FlyV1` scheme. Anything else is an OAuth token and goes with `Bearer`.
const MACAROON_PREFIXES: [&str; 3] = ["fm1r_", "fm1a_", "fm2_"];

/// A Fly API token, ready to send. `Debug` shows the scheme only: the token never reaches a log
/// line, an error or a panic message.
///
/// ```
/// use firebrand::backend::fly::FlyToken;
///
/// let token = FlyToken::new("FlyV1 fm2_lJPE...").unwrap();
/// assert_eq!(token.scheme(), "FlyV1");
/// assert_eq!(format!("{token:?}"), "FlyToken(FlyV1 <redacted>)");
/// assert_eq!(FlyToken::new("oauth-token").unwrap().scheme(), "Bearer");
/// ```
#[derive(Clone)]
pub struct FlyToken {
    scheme: &'static str,
    header: HeaderValue,
}

impl FlyToken {
    /// Whether `other` is the same token, sent the same way.
    pub(crate) fn same_as(&self, other: &FlyToken) -> bool {
        self.header.as_bytes() == other.header.as_bytes()
    }

    /// Reads a token as `fly tokens deploy` or `fly auth token` print it, with or without a
    /// leading `Bearer ` or `FlyV1 `: the scheme is chosen from the token itself.
    ///
    /// # Errors
    /// [`FlyError::Config`] for an empty token or one that cannot be an HTTP header value. The
    /// error does not quote the token.
    pub fn new(raw: &str) -> Result<Self, FlyError> {
        let raw = raw.trim();
        let is_scheme = |word: &str| {
            ["Bearer", "FlyV1"]
                .iter()
                .any(|s| word.eq_ignore_ascii_case(s))
        };
        let token = match raw.split_once(char::is_whitespace) {
            Some((scheme, rest)) if is_scheme(scheme) => rest.trim(),
            _ if is_scheme(raw) => "",
            _ => raw,
        };
        if token.is_empty() {
            return Err(FlyError::Config("the Fly API token is empty".into()));
        }
        let scheme = if MACAROON_PREFIXES.iter().any(|p| token.starts_with(p)) {
            "FlyV1"
        } else {
            "Bearer"
        };
        let mut header = HeaderValue::from_str(&format!("{scheme} {token}")).map_err(|_| {
            FlyError::Config("the Fly API token holds characters an HTTP header cannot".into())
        })?;
        header.set_sensitive(true);
        Ok(Self { scheme, header })
    }

    /// The `Authorization` scheme: `FlyV1` for macaroons, `Bearer` otherwise.
    pub fn scheme(&self) -> &'static str {
        self.scheme
    }

    pub(super) fn header(&self) -> HeaderValue {
        self.header.clone()
    }
}

impl std::fmt::Debug for FlyToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FlyToken({} <redacted>)", self.scheme)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(raw: &str) -> String {
        FlyToken::new(raw)
            .unwrap()
            .header()
            .to_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn macaroons_get_flyv1_and_others_bearer() {
        assert_eq!(header("fm2_abc"), "FlyV1 fm2_abc");
        assert_eq!(header("fm1r_abc"), "FlyV1 fm1r_abc");
        assert_eq!(header("fm1a_abc"), "FlyV1 fm1a_abc");
        assert_eq!(header("oauth123"), "Bearer oauth123");
    }

    #[test]
    fn a_scheme_already_present_is_not_doubled() {
        assert_eq!(header("FlyV1 fm2_abc,fm2_def"), "FlyV1 fm2_abc,fm2_def");
        assert_eq!(header("  flyv1   fm2_abc "), "FlyV1 fm2_abc");
        assert_eq!(header("Bearer oauth123"), "Bearer oauth123");
        assert_eq!(header("Bearer fm2_abc"), "FlyV1 fm2_abc");
    }

    #[test]
    fn bad_tokens_are_refused_without_quoting_them() {
        for raw in ["", "   ", "FlyV1 ", "fm2_SECRET\nINJECT"] {
            let error = FlyToken::new(raw).unwrap_err().to_string();
            assert!(!error.contains("SECRET"), "{error}");
        }
    }

    #[test]
    fn debug_redacts() {
        let shown = format!("{:?}", FlyToken::new("fm2_SECRET").unwrap());
        assert!(!shown.contains("SECRET"), "{shown}");
    }
}
