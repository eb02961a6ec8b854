//! What the remote backends' builders (Fly, Kubernetes) share about the runners they start:
//! their env and the variables forwarded into it from the parent's, the pool's name, the
//! parent's incarnation and the port the pool listens on; the setters of each, and the checks
//! that [`RunnerSpec::check`] makes of them at build. Each backend's own settings (machine
//! metadata, pod labels) stay in its builder.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Reads a setting from the environment, or from what a test gives instead.
pub(crate) type Lookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The default pool name of a remote backend.
pub(crate) const DEFAULT_POOL_NAME: &str = "firebrand";

/// The variables a remote backend forwards from the parent's env by default.
pub(crate) const DEFAULT_FORWARD: [&str; 2] = ["RUST_LOG", "RUST_BACKTRACE"];

/// The longest pool name: it goes into machine and pod names (`<pool>-runner-<12 hex>`, at most
/// 63 characters, a DNS label) and label values.
pub(crate) const MAX_POOL_NAME: usize = 63 - "-runner-".len() - 12;

/// The runner settings a builder collects; see the module's docs.
#[derive(Clone)]
pub(crate) struct RunnerSpec {
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) forward: Vec<String>,
    pub(crate) pool_name: String,
    pub(crate) incarnation: Option<String>,
    pub(crate) port: u16,
    pub(crate) lookup: Lookup,
}

/// A [`RunnerSpec`] as [`RunnerSpec::check`] passed it.
#[derive(Debug, Clone)]
pub(crate) struct CheckedSpec {
    /// `env`, plus each forwarded variable the parent has.
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) pool_name: String,
    /// The one given, or this process's.
    pub(crate) incarnation: String,
    pub(crate) port: u16,
}

impl RunnerSpec {
    pub(crate) fn new(lookup: Lookup) -> Self {
        Self {
            env: BTreeMap::new(),
            forward: DEFAULT_FORWARD.map(String::from).to_vec(),
            pool_name: DEFAULT_POOL_NAME.into(),
            incarnation: None,
            port: 0,
            lookup,
        }
    }

    /// A variable of the parent's env, unless empty.
    pub(crate) fn var(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|v| !v.trim().is_empty())
    }

    /// Checks the settings, and resolves the env and the incarnation. Refuses, by name, a
    /// variable that is empty, holds `=`, or is the boot token's (which the pool sets); a pool
    /// name that is not 1 to [`MAX_POOL_NAME`] lowercase letters, digits or `-`, starting with a
    /// letter or digit; an incarnation that is not a label value (63 letters, digits, `-`, `_`
    /// or `.`).
    pub(crate) fn check(&self) -> Result<CheckedSpec, String> {
        let name = &self.pool_name;
        let name_ok = !name.is_empty()
            && name.len() <= MAX_POOL_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-');
        if !name_ok {
            return Err(format!(
                "pool name `{name}` must be 1 to {MAX_POOL_NAME} lowercase letters, digits or '-', starting with a letter or digit"
            ));
        }
        if let Some(incarnation) = &self.incarnation {
            if !is_label_value(incarnation) {
                return Err(format!(
                    "incarnation `{incarnation}` is not a valid label value"
                ));
            }
        }
        for key in self.env.keys().chain(&self.forward) {
            if key == crate::token::PARENT_ENV || key.is_empty() || key.contains('=') {
                return Err(format!("`{key}` cannot be set in a runner's env"));
            }
        }
        let mut env = self.env.clone();
        for name in &self.forward {
            if let Some(value) = (self.lookup)(name) {
                env.entry(name.clone()).or_insert(value);
            }
        }
        Ok(CheckedSpec {
            env,
            pool_name: self.pool_name.clone(),
            incarnation: self
                .incarnation
                .clone()
                .unwrap_or_else(super::process_incarnation),
            port: self.port,
        })
    }
}

/// Whether `s` is a Kubernetes label value (empty aside): at most 63 letters, digits, `-`,
/// `_` or `.`, starting and ending with a letter or digit. Fly's metadata takes any string, so
/// a value fit for both is this.
pub(crate) fn is_label_value(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// The setters of a remote backend's builder for its [`RunnerSpec`] (a field `runner`): the
/// same code and the same first lines of documentation for both, and the lines each backend
/// adds (`$forward`, `$pool`, `$incarnation`, `$port`).
macro_rules! runner_spec_setters {
    (
        forward_env: $forward:literal,
        pool_name: $pool:literal,
        incarnation: $incarnation:literal,
        port: $port:literal $(,)?
    ) => {
        /// Sets a variable in every runner's env. Runners do not inherit the parent's. A
        /// variable the pool sets itself (`FIREBRAND_PARENT`), or a name that is empty or
        /// holds `=`, fails the build.
        pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
            self.runner.env.insert(name.into(), value.into());
            self
        }

        /// Names of the parent's variables to copy into every runner's env, where set (a
        /// value given with `env` wins). Default: `RUST_LOG` and `RUST_BACKTRACE`.
        #[doc = $forward]
        pub fn forward_env<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
            self.runner
                .forward
                .extend(names.into_iter().map(Into::into));
            self
        }

        /// The pool's name: 1 to 43 lowercase letters, digits or `-`, starting with a letter or
        /// digit; another fails the build. Default: `firebrand`.
        #[doc = $pool]
        pub fn pool_name(mut self, name: impl Into<String>) -> Self {
            self.runner.pool_name = name.into();
            self
        }

        /// This run of the parent, recorded on every runner it starts (letters, digits, `-`,
        /// `_` or `.`, at most 63). Default: a random id, one per process.
        #[doc = $incarnation]
        pub fn incarnation(mut self, incarnation: impl Into<String>) -> Self {
            self.runner.incarnation = Some(incarnation.into());
            self
        }

        /// The UDP port of the pool's endpoint. Default: 0, any free port (the runners learn
        /// it from their boot token).
        #[doc = $port]
        pub fn port(mut self, port: u16) -> Self {
            self.runner.port = port;
            self
        }
    };
}
pub(crate) use runner_spec_setters;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RunnerSpec {
        RunnerSpec::new(Arc::new(|name| {
            (name == "RUST_LOG").then(|| "debug".to_owned())
        }))
    }

    #[test]
    fn the_env_holds_what_was_set_and_what_was_forwarded() {
        let mut spec = spec();
        spec.env.insert("A".into(), "1".into());
        let checked = spec.check().unwrap();
        assert_eq!(checked.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(
            checked.env.get("RUST_LOG").map(String::as_str),
            Some("debug")
        );
        assert!(
            !checked.env.contains_key("RUST_BACKTRACE"),
            "not set in the parent"
        );
        assert_eq!(checked.incarnation, super::super::process_incarnation());
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        for (edit, expected) in [
            (
                Box::new(|s: &mut RunnerSpec| s.pool_name = "Upper".into())
                    as Box<dyn Fn(&mut RunnerSpec)>,
                "pool name `Upper`",
            ),
            // The limit the setter's docs give.
            (Box::new(|s| s.pool_name = "x".repeat(44)), "1 to 43"),
            (Box::new(|s| s.pool_name = "-a".into()), "starting with"),
            (
                Box::new(|s| s.incarnation = Some("a b".into())),
                "incarnation `a b`",
            ),
            (
                Box::new(|s| {
                    s.env.insert(crate::token::PARENT_ENV.into(), "x".into());
                }),
                "FIREBRAND_PARENT",
            ),
            (Box::new(|s| s.forward.push("A=B".into())), "`A=B` cannot"),
        ] {
            let mut spec = spec();
            edit(&mut spec);
            let error = spec.check().unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
    }
}
