//! Request validation against Fly's published OpenAPI spec, with a JSON Schema validator: the
//! fake never hand-codes what a body or query may hold.

use std::collections::HashMap;

use serde_json::{json, Value};

/// `machines-openapi3.json` as Fly publishes it, unmodified.
pub(crate) const SPEC: &str = include_str!("machines-openapi3.json");

/// The validators for the operations the fake serves.
pub(crate) struct Spec {
    bodies: HashMap<&'static str, jsonschema::Validator>,
    /// Query parameters by operation, keyed by name (`metadata.{key}` included as is).
    queries: HashMap<(&'static str, &'static str), Vec<(String, jsonschema::Validator)>>,
}

/// The operations served, as (method, path template) pairs in the spec.
pub(crate) const LIST: (&str, &str) = ("get", "/v1/apps/{app_name}/machines");
pub(crate) const CREATE: (&str, &str) = ("post", "/v1/apps/{app_name}/machines");
pub(crate) const SHOW: (&str, &str) = ("get", "/v1/apps/{app_name}/machines/{machine_id}");
pub(crate) const DELETE: (&str, &str) = ("delete", "/v1/apps/{app_name}/machines/{machine_id}");
pub(crate) const WAIT: (&str, &str) = ("get", "/v1/apps/{app_name}/machines/{machine_id}/wait");
pub(crate) const STOP: (&str, &str) = ("post", "/v1/apps/{app_name}/machines/{machine_id}/stop");
pub(crate) const START: (&str, &str) = ("post", "/v1/apps/{app_name}/machines/{machine_id}/start");
pub(crate) const SUSPEND: (&str, &str) =
    ("post", "/v1/apps/{app_name}/machines/{machine_id}/suspend");
pub(crate) const LEASE: (&str, &str) = ("post", "/v1/apps/{app_name}/machines/{machine_id}/lease");
pub(crate) const SET_METADATA: (&str, &str) = (
    "post",
    "/v1/apps/{app_name}/machines/{machine_id}/metadata/{key}",
);
pub(crate) const RELEASE: (&str, &str) =
    ("delete", "/v1/apps/{app_name}/machines/{machine_id}/lease");

impl Spec {
    pub(crate) fn load() -> Self {
        let spec: Value = serde_json::from_str(SPEC).expect("the embedded spec is JSON");
        let components = &spec["components"];
        let schema = |name: &str| {
            // The component schemas refer to each other as `#/components/schemas/...`: keep
            // them in the root document so that those references resolve.
            let document = json!({
                "$ref": format!("#/components/schemas/{name}"),
                "components": components,
            });
            compile(&document)
        };
        let bodies = HashMap::from([
            ("CreateMachineRequest", schema("CreateMachineRequest")),
            ("StopRequest", schema("StopRequest")),
            ("CreateLeaseRequest", schema("CreateLeaseRequest")),
            (
                "upsertMetadataKeyRequest",
                schema("upsertMetadataKeyRequest"),
            ),
        ]);
        let mut queries = HashMap::new();
        for (method, path) in [
            LIST,
            CREATE,
            SHOW,
            DELETE,
            WAIT,
            STOP,
            START,
            SUSPEND,
            LEASE,
            RELEASE,
            SET_METADATA,
        ] {
            let parameters = spec["paths"][path][method]["parameters"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let query = parameters
                .iter()
                .filter(|p| p["in"] == "query")
                .map(|p| {
                    let name = p["name"].as_str().expect("parameters are named").to_owned();
                    (name, compile(&p["schema"]))
                })
                .collect();
            queries.insert((method, path), query);
        }
        Self { bodies, queries }
    }

    /// Checks `body` against the named component schema.
    pub(crate) fn check_body(&self, schema: &str, body: &Value) -> Result<(), String> {
        let validator = &self.bodies[schema];
        let errors: Vec<String> = validator
            .iter_errors(body)
            .map(|e| format!("{} at `{}`", e, e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Checks each query pair against the operation's declared parameters. Values are typed
    /// as the parameter's schema says (`true`, `60`); a comma-separated value is checked item
    /// by item where the operation allows several.
    pub(crate) fn check_query(
        &self,
        operation: (&'static str, &'static str),
        query: &[(String, String)],
    ) -> Result<(), String> {
        let declared = &self.queries[&operation];
        for (name, value) in query {
            let lookup = if name.starts_with("metadata.") && name.len() > "metadata.".len() {
                "metadata.{key}"
            } else {
                name.as_str()
            };
            let Some((_, validator)) = declared.iter().find(|(n, _)| n == lookup) else {
                return Err(format!("unknown query parameter `{name}`"));
            };
            let items: Vec<&str> = if name == "state" {
                value.split(',').collect()
            } else {
                vec![value.as_str()]
            };
            for item in items {
                let typed = typed(validator, item);
                if !validator.is_valid(&typed) {
                    return Err(format!(
                        "invalid value `{item}` for query parameter `{name}`"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The query string's text as the JSON value the schema expects: a boolean or number where it
/// parses as one the schema accepts, else a string.
fn typed(validator: &jsonschema::Validator, text: &str) -> Value {
    let candidates = [
        text.parse::<bool>().ok().map(Value::from),
        text.parse::<i64>().ok().map(Value::from),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|v| validator.is_valid(v))
        .unwrap_or_else(|| Value::from(text))
}

fn compile(schema: &Value) -> jsonschema::Validator {
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .build(schema)
        .expect("the spec's schemas compile")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_bodies_are_checked_against_the_spec() {
        let spec = Spec::load();
        let good = json!({"name": "a", "config": {"image": "x", "restart": {"policy": "no"}}});
        spec.check_body("CreateMachineRequest", &good).unwrap();
        let bad = json!({"config": {"image": 7, "restart": {"policy": "sometimes"}}});
        let error = spec.check_body("CreateMachineRequest", &bad).unwrap_err();
        assert!(error.contains("/config/image"), "{error}");
        assert!(error.contains("/config/restart/policy"), "{error}");
        let bad_guest = json!({"config": {"guest": {"cpus": "two"}}});
        assert!(spec.check_body("CreateMachineRequest", &bad_guest).is_err());
    }

    #[test]
    fn queries_are_checked_against_the_spec() {
        let spec = Spec::load();
        let q = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect()
        };
        spec.check_query(
            WAIT,
            &q(&[("state", "stopped,destroyed"), ("timeout", "60")]),
        )
        .unwrap();
        spec.check_query(
            LIST,
            &q(&[("metadata.pool", "x"), ("include_deleted", "true")]),
        )
        .unwrap();
        spec.check_query(DELETE, &q(&[("force", "true")])).unwrap();
        assert!(spec.check_query(WAIT, &q(&[("state", "gone")])).is_err());
        assert!(spec.check_query(WAIT, &q(&[("timeout", "soon")])).is_err());
        assert!(spec.check_query(DELETE, &q(&[("force", "yes")])).is_err());
        assert!(spec.check_query(DELETE, &q(&[("forse", "true")])).is_err());
    }

    #[test]
    fn the_embedded_spec_is_fly_s_own() {
        // The workspace keeps Fly's spec beside it in CI checkouts that have it.
        let shared = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fly/machines-openapi3.json"
        );
        if let Ok(original) = std::fs::read_to_string(shared) {
            assert!(
                original == SPEC,
                "runtime's copy of the spec differs from {shared}"
            );
        }
    }
}
