//! Validation of what clients send (a Pod, a Secret, DeleteOptions) and of what the fake
//! answers (a Pod with its status), against Kubernetes 1.37's strict JSON Schemas: unknown
//! and misspelt properties are errors, as they are to a real API server with
//! `fieldValidation=Strict`.

use serde_json::Value;

const DEFINITIONS: &str = include_str!("../schemas/_definitions.json");
const POD: &str = include_str!("../schemas/pod-v1.json");
const SECRET: &str = include_str!("../schemas/secret-v1.json");
const DELETE_OPTIONS: &str = include_str!("../schemas/deleteoptions-meta-v1.json");

/// The URI the schemas name their shared definitions by: `/api/_definitions.json`, relative to
/// their own `$id`s under `https://kubernetes.io/api/`.
const DEFINITIONS_URI: &str = "https://kubernetes.io/api/_definitions.json";

/// Resolves the shared definitions to the embedded file, and nothing else: the fake never
/// fetches a schema.
struct Definitions(std::sync::Arc<Value>);

impl jsonschema::Retrieve for Definitions {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        if uri.as_str() == DEFINITIONS_URI {
            Ok(Value::clone(&self.0))
        } else {
            Err(format!("the fake has no schema at {uri}").into())
        }
    }
}

/// The kinds of body the fake validates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Pod,
    Secret,
    DeleteOptions,
}

pub(crate) struct Schemas {
    pod: jsonschema::Validator,
    secret: jsonschema::Validator,
    delete_options: jsonschema::Validator,
}

impl Schemas {
    pub(crate) fn load() -> Self {
        let definitions: Value =
            serde_json::from_str(DEFINITIONS).expect("the embedded definitions are JSON");
        let definitions = std::sync::Arc::new(definitions);
        let compile = |text: &str| {
            let schema: Value = serde_json::from_str(text).expect("an embedded schema is JSON");
            jsonschema::options()
                .with_retriever(Definitions(std::sync::Arc::clone(&definitions)))
                .build(&schema)
                .expect("the embedded schemas compile")
        };
        Self {
            pod: compile(POD),
            secret: compile(SECRET),
            delete_options: compile(DELETE_OPTIONS),
        }
    }

    /// Checks `body` as a `kind`; the error lists every violation with where it is.
    pub(crate) fn check(&self, kind: Kind, body: &Value) -> Result<(), String> {
        let validator = match kind {
            Kind::Pod => &self.pod,
            Kind::Secret => &self.secret,
            Kind::DeleteOptions => &self.delete_options,
        };
        let errors: Vec<String> = validator
            .iter_errors(body)
            .map(|e| format!("{e} at `{}`", e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}
