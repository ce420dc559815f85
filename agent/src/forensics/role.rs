//! Whether a container is one of the pod's init containers, its app
//! containers or an ephemeral (debug) container.
//!
//! CRI has no field for it. kubelet writes it in the container's
//! `io.kubernetes.container.type` annotation (`init`, `container`,
//! `ephemeral`; pkg/kubelet/kuberuntime/labels.go), which the agent reads
//! from CRI: that is observed. Older kubelets do not write it, and from the
//! kernel's side a failing init container looks exactly like a crash-looping
//! single-container pod (one container, the only one of its pod, exiting
//! non-zero and restarted in the same sandbox), so without the annotation
//! the type is left out rather than guessed.

use serde::{Deserialize, Serialize};

use super::trigger::Basis;

/// kubelet's annotation key.
pub const ANNOTATION: &str = "io.kubernetes.container.type";

/// The pod spec list the container comes from, in kubelet's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerKind {
    Init,
    /// An app container (`spec.containers`).
    Container,
    Ephemeral,
}

impl ContainerKind {
    fn parse(s: &str) -> Option<ContainerKind> {
        match s {
            "init" => Some(ContainerKind::Init),
            "container" => Some(ContainerKind::Container),
            "ephemeral" => Some(ContainerKind::Ephemeral),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContainerType {
    #[serde(rename = "type")]
    pub kind: ContainerKind,
    pub basis: Basis,
    /// Where it was read.
    pub source: String,
}

impl ContainerType {
    /// From kubelet's annotation as CRI gave it (None: absent or unknown).
    pub fn from_annotation(value: Option<&str>) -> Option<ContainerType> {
        Some(ContainerType {
            kind: ContainerKind::parse(value?)?,
            basis: Basis::Observed,
            source: format!("kubelet's {ANNOTATION} annotation"),
        })
    }

    pub fn is_init(&self) -> bool {
        self.kind == ContainerKind::Init
    }
}

/// The sentence for a failed init container: what it blocked. kubelet
/// starts the app containers only once every init container succeeded, and
/// the kernel saw none of them start (`app_started`: a container of the pod
/// that is not an init container had its first exec).
pub fn blocked_sentence(app_started: bool) -> Option<&'static str> {
    (!app_started).then_some(
        "the pod's app containers never started: kubelet starts them only after every init container has succeeded",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_annotation_decides_and_unknown_values_are_left_out() {
        let t = ContainerType::from_annotation(Some("init")).unwrap();
        assert!(t.is_init());
        assert_eq!(t.basis, Basis::Observed);
        assert_eq!(
            ContainerType::from_annotation(Some("container")).map(|t| t.kind),
            Some(ContainerKind::Container)
        );
        assert_eq!(ContainerType::from_annotation(Some("sidecar?")), None);
        assert_eq!(ContainerType::from_annotation(None), None);
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["type"], "init");
        assert_eq!(json["basis"], "observed");
    }
}
