//! What a runner says it serves: the signature of each job. A leaf that the registry makes
//! manifests from and the wire protocol carries (in `Hello`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A job's name and the Rust type names of its argument and result.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobSignature {
    /// The registered name.
    pub name: String,
    /// `std::any::type_name` of the argument type.
    pub args: String,
    /// `std::any::type_name` of the result type.
    pub output: String,
}

/// The signatures of a registry's jobs, sorted by name. A runner sends its manifest when it
/// connects, and the parent refuses it unless it equals the parent's own.
///
/// Type names come from `std::any::type_name`, which is stable for one compiler and one source
/// tree: build the parent and its runners from the same commit with the same toolchain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    jobs: Vec<JobSignature>,
}

impl Manifest {
    /// The manifest of `jobs`, which are sorted by name.
    pub(crate) fn from_sorted(jobs: Vec<JobSignature>) -> Self {
        Self { jobs }
    }

    /// The job signatures, sorted by name.
    pub fn jobs(&self) -> &[JobSignature] {
        &self.jobs
    }

    /// Whether a job of this name is registered.
    pub fn contains(&self, name: &str) -> bool {
        // Job names often share a long prefix (`app.jobs.`), which makes a sorted search
        // compare it again at every step; a length check first rejects most names at once.
        self.jobs
            .iter()
            .any(|s| s.name.len() == name.len() && s.name == name)
    }

    /// A SHA-256 over every signature: equal manifests have equal fingerprints.
    #[must_use]
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for s in &self.jobs {
            for field in [&s.name, &s.args, &s.output] {
                ctx.update(&(field.len() as u64).to_be_bytes());
                ctx.update(field.as_bytes());
            }
        }
        let mut out = [0; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// Describes how `theirs` differs from `self`, one line per job; empty when they agree.
    pub fn differences(&self, theirs: &Manifest) -> Vec<String> {
        let ours: BTreeMap<_, _> = self.jobs.iter().map(|s| (&s.name, s)).collect();
        let other: BTreeMap<_, _> = theirs.jobs.iter().map(|s| (&s.name, s)).collect();
        let mut out = Vec::new();
        for (name, mine) in &ours {
            match other.get(name) {
                None => out.push(format!("job `{name}` is missing on the runner")),
                Some(them) if them != mine => out.push(format!(
                    "job `{name}` is `{} -> {}` on the parent but `{} -> {}` on the runner",
                    mine.args, mine.output, them.args, them.output
                )),
                Some(_) => {}
            }
        }
        for name in other.keys().filter(|n| !ours.contains_key(*n)) {
            out.push(format!("job `{name}` exists only on the runner"));
        }
        out
    }
}
